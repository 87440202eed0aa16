// Draws the dashboard's charts with uPlot from the JSON island #dashboard-data.
// Amounts arrive as decimal strings; they become numbers here only to be drawn, and the
// legend shows the exact strings. After drawing, each chart's element gets
// data-rendered="N points", which the browser test reads back.
(function () {
  "use strict";

  var data = JSON.parse(document.getElementById("dashboard-data").textContent);
  var HEIGHT = 220;
  var ACCENT = "#3f6fd8";
  var STATUS_COLORS = {
    queued: "#8a93a6", running: "#3f6fd8", retrying: "#e0a030",
    succeeded: "#2f9e5b", failed: "#d64545", canceled: "#5b6475",
  };
  var PALETTE = ["#3f6fd8", "#2f9e5b", "#e0a030", "#8e5bd6", "#d64545", "#2aa3b8", "#5b6475"];
  var charts = [];

  // Tick labels with as many decimals as the tick step needs, so that 0.005 and 0.01
  // never both print as "0.01".
  function tickValues(prefix) {
    return function (u, splits) {
      var step = splits.length > 1 ? Math.abs(splits[1] - splits[0]) : 1;
      var fraction = String(+step.toPrecision(10)).split(".")[1] || "";
      return splits.map(function (v) { return prefix + v.toFixed(fraction.length); });
    };
  }

  function zeroBased(u, min, max) { return [0, max > 0 ? max * 1.1 : 1]; }

  function markRendered(el, count) {
    el.dataset.rendered = count + (count === 1 ? " point" : " points");
  }

  function shorten(label, room) {
    // Dated model ids ("...-20250929") say the same without the date in a tick label; the
    // table beside the chart has the full names.
    var text = label.replace(/-\d{8}$/, "");
    var fits = Math.max(4, Math.floor(room / 7));
    return text.length > fits ? text.slice(0, fits - 1) + "\u2026" : text;
  }

  // Categorical bars: x is the index of each label.
  function barChart(el, o) {
    var n = o.values.length;
    var xs = o.values.map(function (_, i) { return i; });
    var bars = uPlot.paths.bars({
      size: [0.6, 80],
      radius: 0.08,
      disp: { fill: { unit: 3, values: function () { return o.colors; } } },
    });
    var room = el.clientWidth / Math.max(n, 1);
    return new uPlot({
      width: el.clientWidth,
      height: HEIGHT,
      cursor: { points: { show: false }, drag: { x: false, y: false } },
      scales: { x: { time: false, range: [-0.5, n - 0.5] }, y: { range: zeroBased } },
      axes: [
        {
          splits: function () { return xs; },
          values: function (u, splits) {
            return splits.map(function (i) { return o.labels[i] === undefined ? "" : shorten(o.labels[i], room); });
          },
          grid: { show: false },
          ticks: { show: false },
        },
        { values: tickValues(o.prefix), size: 64, grid: { stroke: "#eef0f4" } },
      ],
      series: [
        { label: o.xLabel, value: function (u, i) { return i == null ? "" : o.labels[i]; } },
        {
          label: o.label, fill: ACCENT, stroke: ACCENT, paths: bars, points: { show: false },
          value: function (u, v, s, i) { return i == null ? "" : o.texts[i]; },
        },
      ],
      hooks: { draw: [function () { markRendered(el, n); }] },
    }, [xs, o.values], el);
  }

  function drawStatuses() {
    var el = document.getElementById("chart-statuses");
    var names = Object.keys(data.statuses);
    var counts = names.map(function (name) { return data.statuses[name]; });
    charts.push([el, barChart(el, {
      labels: names, values: counts, xLabel: "status", label: "jobs", prefix: "",
      texts: counts.map(function (c) { return c.toLocaleString(); }),
      colors: names.map(function (name) { return STATUS_COLORS[name] || ACCENT; }),
    })]);
  }

  function drawModels() {
    var el = document.getElementById("chart-models");
    var rows = data.spend_by_model.models;
    if (!rows.length) {
      el.textContent = "No spend recorded this month.";
      el.className += " empty";
      markRendered(el, 0);
      return;
    }
    charts.push([el, barChart(el, {
      labels: rows.map(function (r) { return r.model; }),
      values: rows.map(function (r) { return Number(r.cost); }),
      texts: rows.map(function (r) { return "$" + r.cost + " (" + r.jobs.toLocaleString() + " jobs)"; }),
      colors: rows.map(function (_, i) { return PALETTE[i % PALETTE.length]; }),
      xLabel: "model", label: "spend", prefix: "$",
    })]);
  }

  function drawDays() {
    var el = document.getElementById("chart-days");
    var days = data.spend_by_day.days;
    var xs = days.map(function (d) { return Date.parse(d.day + "T00:00:00Z") / 1000; });
    var half = 12 * 3600;
    charts.push([el, new uPlot({
      width: el.clientWidth,
      height: HEIGHT,
      // Days are UTC days, as the usage report counts them; label them so everywhere.
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); },
      cursor: { points: { show: false }, drag: { x: false, y: false } },
      scales: {
        x: { time: true, range: function (u, min, max) { return [min - half, max + half]; } },
        y: { range: zeroBased },
      },
      axes: [
        { grid: { show: false } },
        { values: tickValues("$"), size: 64, grid: { stroke: "#eef0f4" } },
      ],
      series: [
        { label: "day", value: function (u, ts, s, i) { return i == null ? "" : days[i].day; } },
        {
          label: "spend", fill: ACCENT, stroke: ACCENT, points: { show: false },
          paths: uPlot.paths.bars({ size: [0.7, 40], radius: 0.1 }),
          value: function (u, v, s, i) {
            return i == null ? "" : "$" + days[i].cost + " (" + days[i].jobs.toLocaleString() + " jobs)";
          },
        },
      ],
      hooks: { draw: [function () { markRendered(el, days.length); }] },
    }, [xs, days.map(function (d) { return Number(d.cost); })], el)]);
  }

  drawStatuses();
  drawDays();
  drawModels();

  var pending = 0;
  window.addEventListener("resize", function () {
    cancelAnimationFrame(pending);
    pending = requestAnimationFrame(function () {
      charts.forEach(function (pair) {
        pair[1].setSize({ width: pair[0].clientWidth, height: HEIGHT });
      });
    });
  });
})();
