// edgefleet console: charts (uPlot), and live updates from server-sent events. No inline scripts
// anywhere (the CSP forbids them): pages describe what they want with data-* attributes and
// <script type="application/json"> blocks, which this file reads.
(function () {
  "use strict";

  var charts = {};  // element id -> uPlot instance

  function readJson(id) {
    var node = document.getElementById(id);
    return node ? JSON.parse(node.textContent) : null;
  }

  // <div id="X" class="chart" data-chart="X-data"> with <script type="application/json" id="X-data">
  //   {"series": [{"label": "accuracy", "stroke": "#1f6feb", "scale": "%"}, ...],
  //    "data": [[t0, t1, ...], [y0, y1, ...], ...], "height": 220, "sparkline": false}
  function makeChart(el) {
    var spec = readJson(el.getAttribute("data-chart"));
    if (!spec || typeof uPlot === "undefined") { return; }
    var spark = !!spec.sparkline;
    var width = el.clientWidth || (spark ? 240 : 600);
    var series = [{}].concat(spec.series.map(function (s) {
      return { label: s.label, stroke: s.stroke || "#1f6feb", width: s.width || (spark ? 1.5 : 2),
               scale: s.scale || "y", spanGaps: true, points: { show: !spark && spec.data[0].length < 40 } };
    }));
    var scales = { x: { time: spec.time !== false } };
    spec.series.forEach(function (s) {
      if (s.scale === "%") { scales["%"] = { range: [0, 1] }; }
    });
    var axes = spark ? [{ show: false }, { show: false }] : [{}, { scale: spec.series[0].scale || "y" }];
    if (!spark && spec.series.some(function (s) { return (s.scale || "y") !== (spec.series[0].scale || "y"); })) {
      var other = spec.series.filter(function (s) { return (s.scale || "y") !== (spec.series[0].scale || "y"); })[0];
      axes.push({ scale: other.scale || "y", side: 1, grid: { show: false } });
    }
    var opts = {
      width: width,
      height: spec.height || (spark ? 48 : 220),
      series: series,
      scales: scales,
      axes: axes,
      legend: { show: !spark },
      cursor: { show: !spark },
    };
    el.innerHTML = "";
    var chart = new uPlot(opts, spec.data, el);
    chart.maxPoints = spec.maxPoints || 720;
    charts[el.id] = chart;
  }

  function initCharts(root) {
    (root || document).querySelectorAll("[data-chart]").forEach(makeChart);
  }

  // Append one point [x, y1, y2, ...] to a chart, dropping the oldest beyond maxPoints.
  function appendPoint(id, point) {
    var chart = charts[id];
    if (!chart) { return; }
    var data = chart.data.map(function (col, i) { return col.concat([point[i]]); });
    if (data[0].length > chart.maxPoints) { data = data.map(function (col) { return col.slice(-chart.maxPoints); }); }
    chart.setData(data);
  }

  // <div data-sse="/events/..."> opens one EventSource. Events:
  //   "swap":  {"<element id>": "<server-rendered HTML>"}  -> replaces that element's content
  //   "chart": {"id": "<chart id>", "data": [[...], ...]}  -> replaces a chart's data
  //   "point": {"id": "<chart id>", "point": [x, y...]}    -> appends to a chart
  function connect(el) {
    var source = new EventSource(el.getAttribute("data-sse"));
    source.addEventListener("swap", function (event) {
      var parts = JSON.parse(event.data);
      Object.keys(parts).forEach(function (id) {
        var target = document.getElementById(id);
        if (target) {
          target.innerHTML = parts[id];
          if (window.htmx) { window.htmx.process(target); }
        }
      });
      document.body.setAttribute("data-sse-updates", String(Number(document.body.getAttribute("data-sse-updates") || 0) + 1));
    });
    source.addEventListener("chart", function (event) {
      var msg = JSON.parse(event.data);
      if (charts[msg.id]) { charts[msg.id].setData(msg.data); }
    });
    source.addEventListener("point", function (event) {
      var msg = JSON.parse(event.data);
      appendPoint(msg.id, msg.point);
    });
    source.addEventListener("bye", function () { source.close(); });
    // Closing on page hide stops the browser's reconnects (and their errors in the log) on navigation.
    window.addEventListener("pagehide", function () { source.close(); });
  }

  // <form data-confirm="Abort rollout r-1?">: ask before submitting.
  function confirmForms(root) {
    (root || document).querySelectorAll("form[data-confirm]").forEach(function (form) {
      if (form.dataset.confirmBound) { return; }
      form.dataset.confirmBound = "1";
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) { event.preventDefault(); }
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    initCharts(document);
    confirmForms(document);
    document.querySelectorAll("[data-sse]").forEach(connect);
  });
  document.addEventListener("htmx:afterSwap", function (event) {
    initCharts(event.target);
    confirmForms(event.target);
  });
  window.edgefleetConsole = { charts: charts, appendPoint: appendPoint };
})();
