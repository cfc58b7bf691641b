// Shared by the pages: API calls (with the token a #token=... link left), small helpers.
"use strict";
const BW = (() => {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("token")) {
    sessionStorage.setItem("bw-token", hash.get("token"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  async function api(path) {
    const headers = {};
    const token = sessionStorage.getItem("bw-token");
    if (token) headers.Authorization = "Bearer " + token;
    const answer = await fetch("/api/v1" + path, { headers });
    if (!answer.ok) {
      let text = answer.status + "";
      try { text = (await answer.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(text);
    }
    return answer.json();
  }
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value; else node.setAttribute(key, value);
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
    }
    return node;
  }
  const pu = (v) => (v === null || v === undefined ? "-" : (+v).toFixed(2));
  const when = (t) => (t ? new Date(t).toLocaleString() : "-");
  const tiles = (t) => (t ? `${t.processed}/${t.failed}/${t.total ?? "?"}` : "-");
  const duration = (s) => {
    s = Math.round(s);
    return s < 120 ? `${s} s` : s < 7200 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`;
  };
  function jobLink(job) {
    const fleet = new URLSearchParams(location.search).get("fleet");
    const query = new URLSearchParams({ id: job.job_id });
    if (fleet) query.set("fleet", fleet);
    return el("a", { href: "/job?" + query }, job.job_id);
  }
  function jobRows(jobs) {
    return jobs.map((job) => el("tr", { "data-job": job.job_id },
      el("td", {}, jobLink(job)),
      el("td", { class: "status-" + (job.status || "") }, job.status || job.phase),
      el("td", { class: "num" }, job.completion_percentage.toFixed(0) + " %"),
      el("td", { class: "num" }, tiles(job.tiles)),
      el("td", { class: "num" }, pu(job.cost_pu)),
      el("td", { class: "num" }, duration(job.duration_seconds)),
      el("td", {}, when(job.accepted_at)),
      el("td", { class: "muted" }, job.error ? `${job.error.code}: ${job.error.message}` : (job.stopped_reason || ""))));
  }
  return { api, el, pu, when, tiles, duration, jobRows };
})();
