// Boot: load the models, open the job the address names (/ui/jobs/<id>), keep the list of
// recent jobs fresh, and move between jobs with the browser's back and forward.
"use strict";

const App = (() => {
  let recentTimer = null;

  function jobFromPath() {
    const m = location.pathname.slice(Surf.root.length).match(/^\/ui\/jobs\/([0-9a-f-]{36})$/i);
    return m ? m[1].toLowerCase() : null;
  }

  function openFromPath() {
    const id = jobFromPath();
    if (id && id !== JobView.current()) JobView.open(id);
  }

  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso.endsWith("Z") || iso.includes("+") ? iso : `${iso}Z`);
    const today = new Date().toDateString() === d.toDateString();
    return today ? d.toLocaleTimeString() : d.toLocaleString();
  }

  async function refreshRecent() {
    clearTimeout(recentTimer);
    let jobs = [];
    try {
      jobs = await Surf.json("/ui/api/jobs?limit=15");
    } catch (e) {
      return;
    } finally {
      recentTimer = setTimeout(refreshRecent, document.hidden ? 30000 : 5000);
    }
    const rows = $("recent-rows");
    if (!jobs.length) return;
    rows.replaceChildren(...jobs.map((j) => {
      const tr = document.createElement("tr");
      if (j.job_id === JobView.current()) tr.className = "current";
      const link = document.createElement("a");
      link.href = Surf.url(`/ui/jobs/${j.job_id}`);
      link.textContent = j.job_id.slice(0, 8);
      link.addEventListener("click", (e) => {
        e.preventDefault();
        history.pushState({}, "", link.href);
        openFromPath();
        refreshRecent();
      });
      const status = document.createElement("span");
      status.className = `badge ${j.status}`;
      status.textContent = j.status;
      const cells = [when(j.created_at), link, j.model_id, j.kind === "cs" ? "CS" : "invert",
        j.method, status];
      tr.append(...cells.map((c) => {
        const td = document.createElement("td");
        td.append(c);
        return td;
      }));
      return tr;
    }));
  }

  document.addEventListener("DOMContentLoaded", () => {
    Form.onSubmitted = (id) => {
      history.pushState({}, "", Surf.url(`/ui/jobs/${id}`));
      JobView.open(id);
      refreshRecent();
    };
    JobView.onChange = refreshRecent;
    window.addEventListener("popstate", openFromPath);
    // Models first: a 401 there asks for the key once, before the other requests need it.
    Form.loadModels().then(() => {
      openFromPath();
      refreshRecent();
    });
  });

  return { refreshRecent };
})();
