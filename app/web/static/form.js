// The left column: pick a model, give a target, choose the task and options, submit.
"use strict";

const Form = (() => {
  let models = [];
  let model = null; // the selected GET /models entry
  let target = null; // {blob, name, example}
  let onSubmitted = () => {};
  const OPTIONS = ["schedule", "stride", "restarts", "seed", "steps", "final_steps",
    "direct_steps", "lr", "tol"];

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v; else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    node.append(...children);
    return node;
  }

  async function loadModels() {
    const box = $("models");
    try {
      models = await Surf.json("/models");
    } catch (e) {
      box.replaceChildren(el("p", { class: "error" }, `Cannot list models: ${e.message}`));
      return;
    }
    if (!models.length) {
      box.replaceChildren(el("p", { class: "muted" },
        "No models in the store yet: create a demo trajectory with `surfing demo`."));
      return;
    }
    box.replaceChildren(...models.map((m) => {
      const img = el("img", { class: "pixels samples", alt: `samples of ${m.model_id}` });
      Surf.image(img, `/models/${m.model_id}/samples.png?n=16&scale=1`).catch(() => {
        img.alt = "(no samples)";
      });
      const shape = m.output_shape.join("×");
      return el("button", { type: "button", class: "card", "data-model": m.model_id,
        onclick: () => select(m.model_id) },
      img,
      el("span", { class: "card-title" }, m.model_id),
      el("span", { class: "card-meta" }, `${m.arch.kind} · k = ${m.latent_dim} · ` +
        `${m.n_checkpoints} checkpoints`),
      el("span", { class: "card-meta" }, `${m.dataset} · ${shape}`));
    }));
    select(models.length === 1 ? models[0].model_id : (model && model.model_id) || models[0].model_id);
  }

  async function select(id) {
    const m = models.find((x) => x.model_id === id);
    if (!m) return;
    const changed = !model || model.model_id !== id;
    model = m;
    for (const card of document.querySelectorAll(".card")) {
      card.classList.toggle("selected", card.dataset.model === id);
    }
    const slider = $("m");
    slider.max = String(m.n_pixels);
    if (changed) slider.value = String(Math.max(1, Math.round(m.n_pixels / 4)));
    $("n-out").textContent = String(m.n_pixels);
    $("m-out").textContent = slider.value;
    if (changed && target && target.example) setTarget(null);
    if (changed) loadExamples(m);
    update();
  }

  async function loadExamples(m) {
    const box = $("examples");
    box.replaceChildren();
    $("examples-box").hidden = true;
    let list = [];
    try {
      list = await Surf.json(`/ui/api/models/${m.model_id}/examples`);
    } catch (e) {
      return;
    }
    if (!model || model.model_id !== m.model_id || !list.length) return;
    $("examples-dataset").textContent = m.dataset;
    $("examples-box").hidden = false;
    box.replaceChildren(...list.map((ex) => {
      const img = el("img", { class: "pixels", alt: ex.label });
      Surf.image(img, ex.url).catch(() => {});
      return el("button", { type: "button", class: "example", title: ex.label,
        "data-url": ex.url, onclick: () => pickExample(ex) }, img);
    }));
  }

  async function pickExample(ex) {
    const response = await Surf.request(ex.url);
    if (!response.ok) return;
    setTarget({ blob: await response.blob(), name: `${ex.label}.png`, example: ex.url });
  }

  function setTarget(t) {
    target = t;
    const thumb = $("target-thumb");
    if (thumb.dataset.blob) URL.revokeObjectURL(thumb.dataset.blob);
    delete thumb.dataset.blob;
    const isPicture = t && /\.(png|jpe?g)$/i.test(t.name);
    thumb.hidden = !isPicture;
    if (isPicture) thumb.src = thumb.dataset.blob = URL.createObjectURL(t.blob);
    $("drop-text").textContent = t ? `${t.name} — drop or choose another to replace it`
      : "Drop an image here, or choose a file (PNG, JPEG or .npy)";
    for (const b of document.querySelectorAll(".example")) {
      b.classList.toggle("selected", !!(t && t.example === b.dataset.url));
    }
    update();
  }

  function task() {
    return document.querySelector('input[name="task"]:checked').value;
  }

  // Show only the options that apply to the chosen method and task.
  function update() {
    const method = $("method").value;
    for (const label of document.querySelectorAll("[data-methods]")) {
      label.hidden = !label.dataset.methods.split(" ").includes(method);
    }
    $("cs-options").hidden = task() !== "cs";
    for (const radio of document.querySelectorAll('input[name="task"]')) {
      radio.closest("label").classList.toggle("checked", radio.checked);
    }
    $("m-out").textContent = $("m").value;
    const button = $("submit");
    button.textContent = task() === "cs" ? "Recover from A·y" : "Invert";
    button.disabled = !model || !target;
    button.title = !model ? "pick a model first" : !target ? "give a target image first" : "";
  }

  function options() {
    const out = { method: $("method").value };
    for (const name of OPTIONS) {
      const input = $(name);
      if (input.closest("label").hidden || input.value === "") continue;
      out[name] = input.value;
    }
    if (!$("rescue").closest("label").hidden) out.rescue = $("rescue").checked ? "true" : "false";
    return out;
  }

  async function submit(event) {
    event.preventDefault();
    if (!model || !target) return;
    const error = $("form-error");
    error.textContent = "";
    $("submit").disabled = true;
    try {
      const body = new FormData();
      body.append("model_id", model.model_id);
      let path = "/invert";
      if (task() === "cs") {
        const m = $("m").value, seed = $("matrix-seed").value || "0";
        const measure = new FormData();
        measure.append("model_id", model.model_id);
        measure.append("m", m);
        measure.append("seed", seed);
        measure.append("image", target.blob, target.name);
        const b = await Surf.json("/ui/api/measure", { method: "POST", body: measure });
        body.append("measurements", JSON.stringify(b.measurements));
        body.append("matrix_seed", seed);
        body.append("m", m);
        body.append("true_image", target.blob, target.name);
        path = "/cs-recover";
      } else {
        body.append("image", target.blob, target.name);
      }
      for (const [k, v] of Object.entries(options())) body.append(k, v);
      const accepted = await Surf.json(path, { method: "POST", body });
      onSubmitted(accepted.job_id);
    } catch (e) {
      error.textContent = e.message;
    } finally {
      update();
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const drop = $("drop"), file = $("file");
    file.addEventListener("change", () => {
      if (file.files.length) setTarget({ blob: file.files[0], name: file.files[0].name });
    });
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const f = e.dataTransfer.files[0];
      if (f) setTarget({ blob: f, name: f.name });
    });
    for (const input of document.querySelectorAll("#submit-form input, #submit-form select")) {
      input.addEventListener("input", update);
    }
    $("submit-form").addEventListener("submit", submit);
    update();
  });

  return { loadModels, set onSubmitted(f) { onSubmitted = f; } };
})();
