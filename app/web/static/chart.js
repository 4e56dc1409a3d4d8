// The objective curve of a job on a log scale, one colour per pass, drawn on a <canvas>.
"use strict";

const PASS_COLORS = {
  surf: "#2563eb", rescue: "#ea580c", final: "#16a34a", restart: "#9333ea", adam: "#dc2626",
};

class ObjectiveChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.reset();
    window.addEventListener("resize", () => this.draw());
  }

  reset() {
    this.points = []; // {pass, index, y}
    this.draw();
  }

  add(pass, index, y) {
    if (!(y > 0) || !Number.isFinite(y)) return; // log scale: an exact 0 cannot be drawn
    this.points.push({ pass: pass || "surf", index: index ?? 0, y });
    this.draw();
  }

  draw() {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth || 480, h = c.clientHeight || 200;
    if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    g.font = "11px system-ui, sans-serif";
    const left = 46, right = 10, top = 22, bottom = 22;
    const pw = w - left - right, ph = h - top - bottom;
    g.strokeStyle = "#cbd5e1";
    g.strokeRect(left, top, pw, ph);
    g.fillStyle = "#64748b";
    if (!this.points.length) {
      g.fillText("objective (log scale) appears here as the job runs", left + 8, top + ph / 2);
      return;
    }
    const logs = this.points.map((p) => Math.log10(p.y));
    let lo = Math.floor(Math.min(...logs)), hi = Math.ceil(Math.max(...logs));
    if (hi === lo) hi = lo + 1;
    const n = this.points.length;
    const x = (i) => left + (n === 1 ? pw / 2 : (i / (n - 1)) * pw);
    const y = (v) => top + ((hi - v) / (hi - lo)) * ph;
    const step = Math.max(1, Math.ceil((hi - lo) / 6));
    g.textAlign = "right";
    for (let d = lo; d <= hi; d += step) {
      g.strokeStyle = "#eef2f7";
      g.beginPath(); g.moveTo(left, y(d)); g.lineTo(left + pw, y(d)); g.stroke();
      g.fillText(`1e${d}`, left - 4, y(d) + 4);
    }
    g.textAlign = "left";
    g.fillText("updates →", left + pw - 60, top + ph + 15);
    // pass boundaries, and one line per pass
    const legend = [];
    let start = 0;
    for (let i = 1; i <= n; i++) {
      if (i < n && this.points[i].index === this.points[start].index) continue;
      const p = this.points[start];
      const color = PASS_COLORS[p.pass] || "#334155";
      if (start > 0) {
        g.strokeStyle = "#94a3b8"; g.setLineDash([3, 3]);
        g.beginPath(); g.moveTo(x(start), top); g.lineTo(x(start), top + ph); g.stroke();
        g.setLineDash([]);
      }
      g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
      for (let j = start; j < i; j++) {
        const px = x(j), py = y(logs[j]);
        if (j === start) g.moveTo(px, py); else g.lineTo(px, py);
      }
      if (i - start === 1) g.arc(x(start), y(logs[start]), 2, 0, 2 * Math.PI);
      g.stroke(); g.lineWidth = 1;
      if (!legend.includes(p.pass)) legend.push(p.pass);
      start = i;
    }
    let lx = left;
    for (const pass of legend) {
      g.fillStyle = PASS_COLORS[pass] || "#334155";
      g.fillRect(lx, 7, 10, 10);
      g.fillStyle = "#334155";
      g.fillText(pass, lx + 14, 16);
      lx += g.measureText(pass).width + 28;
    }
    g.textAlign = "right";
    g.fillText(`now ${this.points[n - 1].y.toExponential(2)}`, left + pw, 16);
    g.textAlign = "left";
  }
}
