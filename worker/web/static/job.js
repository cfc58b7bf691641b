// The job page: summary, timeline, progress and cost over time, and a Leaflet map of the
// job's features coloured by status, refreshed while the job runs.
"use strict";
(() => {
  const { api, el, pu, when, tiles, duration } = BW;
  const params = new URLSearchParams(location.search);
  const jobId = params.get("id");
  const fleet = params.get("fleet");
  const suffix = fleet ? "?fleet=" + encodeURIComponent(fleet) : "";
  const path = "/jobs/" + encodeURIComponent(jobId);
  const COLOURS = { DONE: "#2e7d32", FATAL: "#c62828", PENDING: "#9e9e9e" };
  const problem = (text) => { document.getElementById("problem").textContent = text; };

  const map = L.map("map", { worldCopyJump: true }).setView([20, 0], 2);
  let features = null;
  let fitted = false;

  function background(config) {
    if (config.basemap_url) {
      L.tileLayer(config.basemap_url, { maxZoom: 19 }).addTo(map);
      return;
    }
    // No basemap reachable: country outlines shipped with the package, and a graticule.
    fetch("/static/vendor/world-atlas/countries-110m.json").then((r) => r.json()).then((world) => {
      L.geoJSON(topojson.feature(world, world.objects.countries), {
        style: { color: "#90a4ae", weight: 1, fillColor: "#fff", fillOpacity: 1 },
        interactive: false,
        className: "country",
      }).addTo(map).bringToBack();
    });
    const lines = [];
    for (let lon = -180; lon <= 180; lon += 10) lines.push([[-85, lon], [85, lon]]);
    for (let lat = -80; lat <= 80; lat += 10) lines.push([[lat, -180], [lat, 180]]);
    L.polyline(lines, { color: "#b0bec5", weight: 0.5, interactive: false, className: "graticule" }).addTo(map);
  }

  function drawFeatures(collection) {
    if (features) features.remove();
    features = L.geoJSON(collection, {
      style: (f) => ({
        color: COLOURS[f.properties.status], weight: 1, fillOpacity: 0.5,
        className: "feature feature-" + f.properties.status,
      }),
      onEachFeature: (f, layer) => layer.bindTooltip(
        `${f.properties.identifier}: ${f.properties.status}`),
    }).addTo(map);
    for (const status of Object.keys(COLOURS)) {
      document.getElementById("count-" + status).textContent = collection.counts[status];
    }
    if (!fitted && collection.features.length) {
      map.fitBounds(features.getBounds(), { padding: [40, 40] });
      fitted = true;
    }
    const delivery = collection.delivery;
    document.getElementById("delivery").textContent = delivery ? "delivered to " + delivery.base : "";
    document.getElementById("feature-problems").textContent = collection.problems.join("; ");
    document.getElementById("map").dataset.features = String(collection.features.length);
  }

  function chart(events) {
    const points = events.filter((e) => e.data && e.data.completion_percentage !== undefined)
      .map((e) => ({ t: Date.parse(e.time), c: e.data.completion_percentage, pu: e.data.cost_pu || 0 }));
    const svg = document.getElementById("chart");
    svg.replaceChildren();
    if (points.length < 2) return;
    const t0 = points[0].t, span = Math.max(1, points[points.length - 1].t - t0);
    const maxPu = Math.max(...points.map((p) => p.pu), 1e-9);
    const line = (value, colour) => {
      const node = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      node.setAttribute("points", points.map((p) =>
        `${(400 * (p.t - t0)) / span},${118 - 116 * value(p)}`).join(" "));
      node.setAttribute("fill", "none");
      node.setAttribute("stroke", colour);
      node.setAttribute("stroke-width", "2");
      node.setAttribute("vector-effect", "non-scaling-stroke");
      svg.append(node);
    };
    line((p) => p.c / 100, "#2e7d32");
    line((p) => p.pu / maxPu, "#1565c0");
  }

  function summary(job) {
    document.getElementById("job-name").textContent = `job ${job.job_id} (fleet ${job.fleet_id})`;
    const rows = [
      ["status", job.status || job.phase],
      ["batch request", job.batch_request_id || "-"],
      ["completion", job.completion_percentage.toFixed(1) + " %"],
      ["tiles done/failed/total", tiles(job.tiles)],
      ["cost", pu(job.cost_pu) + " PU" + (job.max_cost_pu ? ` (cap ${pu(job.max_cost_pu)})` : "")],
      ["accepted", when(job.accepted_at)],
      ["took", duration(job.duration_seconds)],
      ["ended", when(job.ended_at)],
    ];
    if (job.stopped_reason) rows.push(["stopped", job.stopped_reason]);
    if (job.error) rows.push(["error", `[${job.error.source}] ${job.error.code}: ${job.error.message}`]);
    if (job.batch_requests.length > 1) {
      rows.push(["batch requests", job.batch_requests.map((r) => `${r.id} (${r.role})`).join(", ")]);
    }
    document.querySelector("#summary tbody").replaceChildren(...rows.map(([k, v]) =>
      el("tr", {}, el("th", {}, k), el("td", { id: "field-" + k.split(" ")[0], class: k === "status" ? "status-" + v : "" }, v))));
    document.getElementById("progress").style.width = job.completion_percentage + "%";
    document.getElementById("timeline").replaceChildren(...job.events.map((e) => el("li", {},
      `${when(e.time)} ${e.type.replace(/^.*\./, "")} `,
      el("b", {}, e.data.status || e.data.action || ""),
      e.data.completion_percentage !== undefined ? ` ${e.data.completion_percentage.toFixed(0)} %` : "",
      e.data.cost_pu ? ` ${pu(e.data.cost_pu)} PU` : "")));
    chart(job.events);
  }

  async function refresh() {
    const job = await api(path + suffix);
    summary(job);
    drawFeatures(await api(path + "/features" + suffix));
    document.body.dataset.status = job.status || job.phase;
    document.body.dataset.loaded = "true";
    problem("");
    return job.ended_at === null;
  }

  async function loop(seconds) {
    let running = true;
    try { running = await refresh(); } catch (error) { problem(String(error.message || error)); }
    // An ended job does not change: one more read, then rest.
    if (running) setTimeout(() => loop(seconds), seconds * 1000);
  }

  if (!jobId) { problem("no job: open /job?id=JOB_ID"); return; }
  api("/config").then((config) => { background(config); loop(config.refresh_seconds); })
    .catch((error) => problem(String(error.message || error)));
})();
