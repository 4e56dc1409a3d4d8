// One job on the page: watch it live (Server-Sent Events from GET /jobs/{id}/events, else
// polling GET /jobs/{id}), show pass / stage / objective / preview, then the result.
"use strict";

const TERMINAL = ["succeeded", "failed", "canceled"];
const $ = (id) => document.getElementById(id);

const JobView = (() => {
  let current = null; // {id, job, source, timer, lastKey}
  let chart = null;
  let onChange = () => {};

  function fmt(v, digits = 3) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(digits - 1) : v.toPrecision(digits);
  }

  function stop() {
    if (!current) return;
    if (current.source) current.source.close();
    clearTimeout(current.timer);
    current = null;
  }

  function open(id, job) {
    stop();
    chart = chart || new ObjectiveChart($("chart"));
    chart.reset();
    current = { id, job: null, source: null, timer: null, lastKey: null };
    $("job-empty").hidden = true;
    $("job-body").hidden = false;
    $("result").hidden = true;
    $("job-error").textContent = "";
    $("preview").removeAttribute("src");
    const progress = $("progress");
    progress.dataset.events = "0";
    progress.dataset.previews = "0";
    for (const k of ["pass", "passIndex", "stage", "stages", "transport"]) delete progress.dataset[k];
    $("pass-label").textContent = "waiting for a worker…";
    $("stage").textContent = $("stages").textContent = "–";
    $("bar-fill").style.width = "0";
    $("step-label").textContent = $("objective-label").textContent = "";
    const link = $("job-link");
    link.textContent = id.slice(0, 8);
    link.href = Surf.url(`/ui/jobs/${id}`);
    link.title = `stable address of job ${id}`;
    if (job) render(job);
    watch(id);
  }

  // ---- transports ----------------------------------------------------------------------

  function watch(id) {
    if (!window.EventSource) return poll(id);
    const source = new EventSource(Surf.eventsUrl(`/jobs/${id}/events`));
    current.source = source;
    let received = false, failures = 0;
    const mine = () => current && current.id === id && current.source === source;
    const on = (name, handler) => source.addEventListener(name, (e) => {
      if (!mine()) return;
      received = true; failures = 0;
      setTransport("sse");
      handler(JSON.parse(e.data));
    });
    on("snapshot", (job) => render(job));
    on("progress", (p) => showProgress(p));
    on("status", (s) => showStatus(s.status, s.error));
    on("end", (job) => { source.close(); render(job); });
    // "timeout": the server closes the stream; EventSource reconnects by itself (snapshot).
    source.onerror = () => {
      if (!mine()) return;
      failures += 1;
      // Closed for good (404, 401, not an event stream) or never opened: poll instead.
      if (source.readyState === EventSource.CLOSED || (!received && failures >= 2)
          || failures >= 5) {
        source.close();
        current.source = null;
        poll(id);
      }
    };
  }

  async function poll(id) {
    if (!current || current.id !== id) return;
    setTransport("poll");
    try {
      const job = await Surf.json(`/jobs/${id}`);
      if (!current || current.id !== id) return;
      const before = current.lastKey;
      render(job);
      if (job.status === "running" && current.lastKey !== before) fetchPreview(id);
      if (TERMINAL.includes(job.status)) return;
    } catch (e) {
      $("job-error").textContent = e.message;
      if (e.status === 404) return;
    }
    current.timer = setTimeout(() => poll(id), 500);
  }

  async function fetchPreview(id) {
    const r = await Surf.request(`/jobs/${id}/preview.png`).catch(() => null);
    if (!r || !r.ok || !current || current.id !== id) return;
    const img = $("preview");
    if (img.dataset.blob) URL.revokeObjectURL(img.dataset.blob);
    img.src = img.dataset.blob = URL.createObjectURL(await r.blob());
    bump("previews");
  }

  function setTransport(kind) {
    $("progress").dataset.transport = kind;
    $("transport").textContent = kind === "sse" ? "live (event stream)" : "live (polling)";
  }

  function bump(name) {
    const el = $("progress");
    el.dataset[name] = String(Number(el.dataset[name] || 0) + 1);
  }

  // ---- rendering -------------------------------------------------------------------------

  function passLabel(p, job) {
    const params = (job && job.params) || {};
    const round = p.pass_round;
    switch (p.pass) {
      case "surf": return "surfing the trajectory";
      case "rescue": return `rescue: re-surfing from a fresh start${round ? `, round ${round}` : ""}`;
      case "final": return job && ["surf", "lm-restarts"].includes(job.method)
        ? "Levenberg-Marquardt on G_T from x_init" : "final polish on G_T";
      case "restart": {
        if (job && job.method === "surf") return `restart ${round} on G_T: fresh starts for unfitted targets`;
        const r = params.restarts || (job && job.method === "lm-restarts" ? 3 : 4);
        return round == null ? `${r} random restarts on G_T (one batch)` : `restart ${round} of ${r}`;
      }
      case "adam": return "direct descent (Adam) on G_T";
      default: return p.pass ? p.pass : "running";
    }
  }

  function showProgress(p) {
    if (!p || !current) return;
    const el = $("progress");
    const key = `${p.pass_index ?? ""}/${p.stage ?? ""}/${p.objective ?? ""}`;
    if (key === current.lastKey && !p.preview) return;
    current.lastKey = key;
    bump("events");
    if (p.pass != null) el.dataset.pass = p.pass;
    if (p.pass_index != null) el.dataset.passIndex = String(p.pass_index);
    if (p.stage != null) el.dataset.stage = String(p.stage);
    if (p.stages != null) el.dataset.stages = String(p.stages);
    $("pass-label").textContent = p.pass_index != null
      ? `pass ${p.pass_index + 1}: ${passLabel(p, current.job)}` : passLabel(p, current.job);
    $("stage").textContent = p.stage ?? "–";
    $("stages").textContent = p.stages ?? "–";
    const frac = p.stage && p.stages ? Math.min(1, p.stage / p.stages) : 0;
    $("bar-fill").style.width = `${(100 * frac).toFixed(1)}%`;
    $("step-label").textContent = p.step != null ? `checkpoint step ${p.step} ·` : "";
    $("objective-label").textContent = p.objective != null ? `objective ${fmt(p.objective)}` : "";
    if (p.objective != null) chart.add(p.pass, p.pass_index, p.objective);
    if (p.preview) {
      $("preview").src = `data:image/png;base64,${p.preview}`;
      bump("previews");
    }
  }

  function showStatus(status, error) {
    const badge = $("status");
    badge.textContent = status;
    badge.className = `badge ${status}`;
    $("cancel").hidden = !["queued", "running"].includes(status);
    if (error) $("job-error").textContent = error;
    onChange();
  }

  function render(job) {
    if (!current || job.job_id !== current.id) return;
    const was = current.job && current.job.status;
    current.job = job;
    const params = job.params || {};
    const task = job.kind === "cs" ? `compressed sensing, m = ${params.m} of n = ${params.n}` +
      (params.matrix && params.matrix.seed != null ? `, matrix seed ${params.matrix.seed}` : "")
      : "invert";
    $("job-summary").textContent = `${job.model_id} · ${task} · ${job.method}` +
      (params.schedule ? ` (${params.schedule})` : "") + ` · ${job.n_targets} target(s)` +
      (job.attempt > 1 ? ` · attempt ${job.attempt}` : "");
    if (job.status !== was) showStatus(job.status, job.error);
    if (job.progress) showProgress(job.progress);
    if (job.status === "succeeded" && job.result) showResult(job);
    if (TERMINAL.includes(job.status)) {
      $("transport").textContent = "";
      if (current.source) { current.source.close(); current.source = null; }
      clearTimeout(current.timer);
    }
  }

  async function showResult(job) {
    const id = job.job_id, r = job.result;
    if ($("result").dataset.job === id && !$("result").hidden) return;
    $("result").dataset.job = id;
    $("result").hidden = false;
    if (!chart.points.length) {
      for (const t of r.trace || []) chart.add(t.pass || (t.rescued != null ? "rescue" : "surf"),
        t.pass_index ?? (t.rescued != null ? 1 : 0), t.objective_mean);
    }
    const rows = [
      ["pixel error ‖G(x) − y‖²/n", r.pixel_error && r.pixel_error[0], "pixel-error"],
      ["measurement residual ‖AG(x) − b‖²/m", r.measurement_residual && r.measurement_residual[0],
        "residual"],
      ["objective ½‖AG(x) − b‖²", r.objective[0], "objective"],
      ["generator evaluations", r.evals, "evals"],
      ["solve time", job.timings && job.timings.solve_s != null ? `${job.timings.solve_s} s` : null],
    ];
    $("metrics").replaceChildren(...rows.filter((row) => row[1] != null).map(([name, v, id]) => {
      const tr = document.createElement("tr");
      const th = document.createElement("th"); th.textContent = name;
      const td = document.createElement("td");
      td.textContent = typeof v === "number" && id !== "evals" ? fmt(v, 4) : String(v);
      if (id) { td.id = id; if (typeof v === "number") td.dataset.value = String(v); }
      tr.append(th, td);
      return tr;
    }));
    $("latent").textContent = `[${r.latent[0].map((v) => v.toFixed(3)).join(", ")}]`;
    const target = $("result-target"), recon = $("result-recon");
    const [hasTarget] = await Promise.all([
      Surf.image(target, `/ui/api/jobs/${id}/target.png`).then(() => true, () => false),
      Surf.image(recon, `/jobs/${id}/reconstruction.png`).catch((e) => {
        $("job-error").textContent = e.message;
      }),
    ]);
    target.hidden = !hasTarget;
    $("target-caption").textContent = hasTarget ? "target y" : "no true image given";
    $("result-diff").hidden = !hasTarget;
    $("diff-caption").textContent = hasTarget ? difference(target, recon, $("result-diff")) : "";
  }

  // |target - reconstruction| per pixel and channel, stretched so its maximum shows white.
  function difference(a, b, canvas) {
    const w = a.naturalWidth, h = a.naturalHeight;
    if (!w || w !== b.naturalWidth || h !== b.naturalHeight) return "|difference|: sizes differ";
    canvas.width = w; canvas.height = h;
    const g = canvas.getContext("2d", { willReadFrequently: true });
    g.drawImage(a, 0, 0); const pa = g.getImageData(0, 0, w, h);
    g.drawImage(b, 0, 0); const pb = g.getImageData(0, 0, w, h);
    let max = 0;
    for (let i = 0; i < pa.data.length; i += 4) {
      for (let c = 0; c < 3; c++) {
        const d = Math.abs(pa.data[i + c] - pb.data[i + c]);
        pa.data[i + c] = d; max = Math.max(max, d);
      }
      pa.data[i + 3] = 255;
    }
    const gain = max ? 255 / max : 1;
    for (let i = 0; i < pa.data.length; i += 4) for (let c = 0; c < 3; c++) pa.data[i + c] *= gain;
    g.putImageData(pa, 0, 0);
    return `|difference| (max ${(max / 255).toFixed(3)} shown white)`;
  }

  async function cancel() {
    if (!current) return;
    try {
      render(await Surf.json(`/jobs/${current.id}`, { method: "DELETE" }));
    } catch (e) {
      $("job-error").textContent = e.message;
    }
  }

  function download(kind) {
    if (!current) return;
    const id = current.id;
    const files = {
      png: [`/jobs/${id}/reconstruction.png`, `reconstruction-${id.slice(0, 8)}.png`],
      latent: [`/jobs/${id}/latent.npy`, `latent-${id.slice(0, 8)}.npy`],
      json: [`/jobs/${id}`, `job-${id.slice(0, 8)}.json`],
    };
    Surf.download(...files[kind]).catch((e) => { $("job-error").textContent = e.message; });
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("cancel").addEventListener("click", cancel);
    for (const kind of ["png", "latent", "json"]) {
      $(`dl-${kind}`).addEventListener("click", (e) => { e.preventDefault(); download(kind); });
    }
  });

  return {
    open, stop, current: () => current && current.id,
    set onChange(f) { onChange = f; },
  };
})();
