// cmg stream --dashboard: one tile per camera, updated from server-sent events (/events).
"use strict";
(function () {
  const tiles = new Map();  // camera index -> {el, plot, thumbIds, sliderReady}
  const $ = (sel, root) => (root || document).querySelector(sel);
  const fmt = (v, d) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));

  function tile(cam) {
    let t = tiles.get(cam.index);
    if (t) return t;
    const el = $("#camera-template").content.firstElementChild.cloneNode(true);
    el.dataset.index = cam.index;
    $(".name", el).textContent = cam.name;
    $("#cameras").appendChild(el);
    const chartEl = $(".chart", el);
    const plot = new uPlot({
      width: Math.max(300, chartEl.clientWidth || 520), height: 180,
      title: "latency per second, last minute (ms)",
      series: [{}, {label: "p50", stroke: "#2a7", width: 2}, {label: "p99", stroke: "#d53", width: 2}],
      axes: [{space: 70}, {size: 50}],
    }, [[], [], []], chartEl);
    t = {el, plot, thumbIds: "", sliderReady: false};
    tiles.set(cam.index, t);
    const slider = $(".slider", el);
    slider.addEventListener("input", () => { $(".threshold-value", el).textContent = Number(slider.value).toFixed(3); });
    slider.addEventListener("change", () => setThreshold(cam.index, Number(slider.value)));
    $(".reset", el).addEventListener("click", () => setThreshold(cam.index, null));
    return t;
  }

  function setThreshold(index, value) {
    const token = new URLSearchParams(location.search).get("token") || "";  // the announced URL's
    fetch(`/cameras/${index}/threshold`, {method: "POST", headers: {"Content-Type": "application/json", "X-CMG-Token": token},
      body: JSON.stringify({value})}).then((r) => {
      if (!r.ok) r.text().then((m) => { $("#status").textContent = `threshold refused: ${m}`; });
    });
  }

  function updateSlider(t, cam) {
    const slider = $(".slider", t.el);
    const out = $(".threshold-value", t.el);
    if (cam.score_range) {
      let [lo, hi] = cam.score_range;
      for (const v of [cam.threshold, cam.last_threshold]) if (v !== null && v !== undefined) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
      const pad = Math.max((hi - lo) * 0.1, 0.01);
      const min = lo - pad, max = hi + pad;
      if (!t.sliderReady || min < Number(slider.min) || max > Number(slider.max)) {
        slider.min = min.toFixed(4); slider.max = max.toFixed(4); slider.step = ((max - min) / 400).toFixed(5);
        if (!t.sliderReady) slider.value = ((min + max) / 2).toFixed(4);
        slider.disabled = false;
        t.sliderReady = true;
      }
    }
    if (document.activeElement !== slider) {
      if (cam.threshold !== null) { slider.value = cam.threshold; out.textContent = cam.threshold.toFixed(3); }
      else out.textContent = "calibrated";
    }
    t.el.dataset.threshold = cam.threshold === null ? "" : cam.threshold;
  }

  function updateThumbs(t, cam) {
    const ids = cam.flagged.map((f) => f.id).join(",");
    if (ids === t.thumbIds) return;
    t.thumbIds = ids;
    const box = $(".thumbs", t.el);
    const old = new Map([...box.children].map((img) => [img.dataset.id, img]));
    box.replaceChildren(...cam.flagged.map((f) => {
      let img = old.get(String(f.id));
      if (!img) {
        img = document.createElement("img");
        img.className = "thumb";
        img.dataset.id = f.id;
        img.src = `/frames/${f.id}/thumb.png`;
        const caption = `frame ${f.frame_id} · score ${f.score.toFixed(4)}` +
          (f.threshold === null || f.threshold === undefined ? " · calibrated threshold" : ` · threshold ${f.threshold.toFixed(4)}`);
        img.alt = img.title = caption;
        img.addEventListener("click", () => openViewer(f.id, `${cam.name}: ${caption}`));
      }
      return img;
    }));
  }

  function openViewer(id, caption) {
    $("#viewer-img").src = `/frames/${id}/full.png`;
    $("#viewer-caption").textContent = caption;
    $("#viewer").hidden = false;
  }
  $("#viewer-close").addEventListener("click", () => { $("#viewer").hidden = true; });
  $("#viewer").addEventListener("click", (e) => { if (e.target.id === "viewer") $("#viewer").hidden = true; });

  function updateCamera(cam) {
    const t = tile(cam);
    $(".frames", t.el).textContent = cam.frames;
    $(".fps", t.el).textContent = fmt(cam.fps, 1);
    $(".p50", t.el).textContent = fmt(cam.p50_ms, 1);
    $(".p99", t.el).textContent = fmt(cam.p99_ms, 1);
    $(".rate", t.el).textContent = cam.anomaly_rate === null ? "–" : `${(100 * cam.anomaly_rate).toFixed(1)}%`;
    $(".errors", t.el).textContent = cam.errors;
    $(".errors", t.el).title = cam.last_error || "";
    t.plot.setData([cam.chart.t, cam.chart.p50, cam.chart.p99]);
    updateSlider(t, cam);
    updateThumbs(t, cam);
  }

  function updateMetrics(m) {
    $("#metrics-url").textContent = m.url ? `(${m.url})` : "";
    const err = $("#metrics-error");
    err.hidden = !m.error;
    err.textContent = m.error ? `metrics unavailable: ${m.error}` : "";
    $("#metrics tbody").replaceChildren(...m.models.map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.model = r.model;
      for (const v of [r.model, fmt(r.req_per_s, 1), fmt(r.queue_ms, 2), fmt(r.compute_ms, 2), r.inferences, r.executions, r.failure]) {
        const td = document.createElement("td");
        td.textContent = v;
        tr.appendChild(td);
      }
      return tr;
    }));
  }

  const source = new EventSource("/events");
  source.onmessage = (e) => {
    const snap = JSON.parse(e.data);
    snap.cameras.forEach(updateCamera);
    updateMetrics(snap.metrics);
    $("#status").textContent = `live · up ${Math.round(snap.uptime_s)} s`;
    $("#status").classList.remove("down");
  };
  source.addEventListener("end", () => { source.close(); $("#status").textContent = "stream ended"; $("#status").classList.add("down"); });
  source.onerror = () => { $("#status").textContent = "disconnected: retrying"; $("#status").classList.add("down"); };
})();
