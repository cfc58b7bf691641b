// The fleet page: totals, jobs by status, the slowest and the failing, a filtered list.
"use strict";
(() => {
  const { api, el, pu, jobRows } = BW;
  const params = new URLSearchParams(location.search);
  const fleetQuery = params.get("fleet") ? "fleet=" + encodeURIComponent(params.get("fleet")) : "";
  const form = document.getElementById("filters");
  form.q.value = params.get("q") || "";
  form.status.value = params.get("status") || "";

  function fill(id, rows) {
    const body = document.querySelector(`#${id} tbody`);
    body.replaceChildren(...rows);
  }

  async function refresh() {
    try {
      const overview = await api("/fleet?" + fleetQuery);
      document.getElementById("fleet-name").textContent = "fleet " + overview.fleet_id;
      const t = overview.tiles;
      document.getElementById("totals").replaceChildren(
        ...[["jobs", overview.jobs], ["cost (PU)", pu(overview.cost_pu)],
          ["tiles done", t.processed], ["tiles failed", t.failed], ["tiles", t.total]]
          .map(([label, n]) => el("div", { class: "card" }, el("div", { class: "n" }, String(n)), label)));
      fill("by-status", Object.entries(overview.by_status).map(([status, s]) =>
        el("tr", { "data-status": status },
          el("td", { class: "status-" + status }, status),
          el("td", { class: "num" }, String(s.jobs)),
          el("td", { class: "num" }, pu(s.cost_pu)),
          el("td", { class: "num" }, `${s.tiles.processed}/${s.tiles.failed}/${s.tiles.total}`))));
      fill("slowest", jobRows(overview.slowest_active));
      fill("failing", jobRows(overview.failing));
      const query = new URLSearchParams({ limit: "100" });
      if (params.get("fleet")) query.set("fleet", params.get("fleet"));
      if (form.q.value) query.set("q", form.q.value);
      if (form.status.value) query.set("status", form.status.value);
      const list = await api("/jobs?" + query);
      fill("jobs", jobRows(list.jobs));
      document.getElementById("jobs-count").textContent = `${list.jobs.length} of ${list.total} job(s)`;
      document.getElementById("problem").textContent = "";
      document.body.dataset.loaded = "true";
    } catch (error) {
      document.getElementById("problem").textContent = String(error.message || error);
    }
  }
  form.addEventListener("submit", (event) => { event.preventDefault(); refresh(); });
  api("/config").then((config) => {
    refresh();
    setInterval(refresh, config.refresh_seconds * 1000);
  }).catch((error) => { document.getElementById("problem").textContent = error.message; });
})();
