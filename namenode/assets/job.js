const NS = "http://www.w3.org/2000/svg";
function el(name, attrs, text) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function chart(svg, series) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = +svg.getAttribute("width"), H = +svg.getAttribute("height"), L = 56, B = 28, T = 10, R = 110;
  const pts = series.flatMap(s => s.points).filter(p => Number.isFinite(p[1]));
  if (pts.length === 0) { svg.appendChild(el("text", {x: L, y: H / 2}, "no points yet")); return; }
  let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
  let y0 = Math.min(...pts.map(p => p[1])), y1 = Math.max(...pts.map(p => p[1]));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += 0.5; y0 -= 0.5; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R), sy = y => H - B - (y - y0) / (y1 - y0) * (H - B - T);
  svg.appendChild(el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#8c959f"}));
  svg.appendChild(el("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#8c959f"}));
  svg.appendChild(el("text", {x: L - 6, y: T + 10, "text-anchor": "end", "font-size": 11}, y1.toPrecision(3)));
  svg.appendChild(el("text", {x: L - 6, y: H - B, "text-anchor": "end", "font-size": 11}, y0.toPrecision(3)));
  svg.appendChild(el("text", {x: L, y: H - 8, "font-size": 11}, "step " + x0));
  svg.appendChild(el("text", {x: W - R, y: H - 8, "text-anchor": "end", "font-size": 11}, "step " + x1));
  series.forEach((s, i) => {
    const ok = s.points.filter(p => Number.isFinite(p[1]));
    const line = el("polyline", {class: "series " + s.name, "data-points": ok.length, fill: "none",
      stroke: s.color, "stroke-width": 2, points: ok.map(p => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ")});
    svg.appendChild(line);
    if (ok.length === 1 || s.dots) ok.forEach(p => svg.appendChild(el("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: s.color})));
    svg.appendChild(el("text", {x: W - R + 8, y: T + 14 + 16 * i, fill: s.color, "font-size": 12}, s.label));
  });
}
function secs(s) { return s < 120 ? s.toFixed(0) + " s" : s < 7200 ? (s / 60).toFixed(0) + " min" : (s / 3600).toFixed(1) + " h"; }
function bytes(n) { const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0; while (n >= 1024 && i < 4) { n /= 1024; i++; } return n.toFixed(i ? 1 : 0) + " " + u[i]; }
async function tick() {
  let j;
  try { j = await (await fetch("/api/jobs/" + JOB)).json(); } catch (e) { setTimeout(tick, 2000); return; }
  const steps = j.points.filter(p => p.val_loss === null || p.val_loss === undefined);
  const vals = j.points.filter(p => p.val_loss !== null && p.val_loss !== undefined);
  chart(document.getElementById("loss"), [
    {name: "train-loss", label: "training", color: "#0969da", points: steps.map(p => [p.iteration, p.loss])},
    {name: "val-loss", label: "validation", color: "#cf222e", dots: true, points: vals.map(p => [p.iteration, p.val_loss])}]);
  chart(document.getElementById("accuracy"), [
    {name: "train-accuracy", label: "training", color: "#0969da", points: steps.map(p => [p.iteration, p.accuracy])},
    {name: "val-accuracy", label: "validation", color: "#cf222e", dots: true, points: vals.map(p => [p.iteration, p.val_accuracy])}]);
  const last = j.last;
  document.getElementById("state").textContent = j.shown_state;
  document.getElementById("workers").textContent = j.workers.join(", ");
  if (last) {
    document.getElementById("progress").textContent = j.iterations ? `${last.iteration}/${j.iterations} (epoch ${last.epoch + 1})` : `step ${last.iteration}`;
    document.getElementById("rate").textContent = last.samples_per_sec.toFixed(0);
    document.getElementById("bytes").textContent = bytes(last.bytes_moved);
    const t = document.getElementById("step-times");
    t.innerHTML = "<tr><th>Worker</th><th class=n>ms</th></tr>";
    for (const [w, ms] of last.worker_step_ms) {
      const r = t.insertRow(); r.insertCell().textContent = w; const c = r.insertCell(); c.className = "n"; c.textContent = ms.toFixed(1);
    }
  }
  document.getElementById("eta").textContent = j.eta_secs === null ? "" : secs(j.eta_secs);
  document.getElementById("result").textContent = j.result || j.error || "";
  const lost = document.getElementById("lost");
  lost.innerHTML = "";
  for (const [w, e] of j.lost) { const li = document.createElement("li"); li.textContent = w + ": " + e; lost.appendChild(li); }
  if (j.state === "running") setTimeout(tick, 1000);
}
tick();
