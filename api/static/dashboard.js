// Draws the dashboard's charts with uPlot from the JSON island #dashboard-data.
// Amounts arrive as decimal strings: they become numbers here only to be drawn, and the
// readout under a chart shows the exact strings. After drawing, each chart's element gets
// data-rendered="N points" (the browser test reads it back).
(function () {
  "use strict";

  var data = JSON.parse(document.getElementById("dashboard-data").textContent);
  var HEIGHT = 210;
  var ACCENT = "#3f6fd8";
  var RED = "#d64545";
  var AMBER = "#e0a030";
  var PALETTE = ["#3f6fd8", "#2f9e5b", "#e0a030", "#8e5bd6", "#d64545", "#2aa3b8", "#5b6475"];
  var charts = [];

  function markRendered(el, count) {
    el.dataset.rendered = count + (count === 1 ? " point" : " points");
  }

  // Tick labels with as many decimals as the tick step needs, so that 0.005 and 0.01
  // never both print as "0.01".
  function dollarTicks(u, splits) {
    var step = splits.length > 1 ? Math.abs(splits[1] - splits[0]) : 1;
    var decimals = (String(+step.toPrecision(10)).split(".")[1] || "").length;
    return splits.map(function (v) { return "$" + v.toFixed(decimals); });
  }

  function zeroBased(u, min, max) { return [0, max > 0 ? max * 1.1 : 1]; }

  function describe(row) {
    return "$" + row.cost + " over " + row.jobs.toLocaleString() + (row.jobs === 1 ? " job" : " jobs");
  }

  // The readout under a chart: the hovered point's exact figures, else its resting text.
  function readout(id, text) {
    var el = document.getElementById(id);
    var resting = el.textContent;
    return function (u) {
      var i = u.cursor.idx;
      el.textContent = i == null ? resting : text(i);
    };
  }

  function shorten(label, room) {
    // A tick label must fit its bar's room: a dated model id ("...-20250929") reads the
    // same without its date, and the table beside the chart has the full names.
    var fits = Math.max(4, Math.floor(room / 7.5));
    var text = label.length > fits ? label.replace(/-\d{8}$/, "") : label;
    return text.length > fits ? text.slice(0, fits - 1) + "\u2026" : text;
  }

  // `ys`: one series of values, or a list of them.
  function chart(el, options, xs, ys) {
    options.width = el.clientWidth;
    options.height = HEIGHT;
    options.legend = { show: false };
    options.cursor = { points: { show: false }, drag: { x: false, y: false } };
    options.hooks.draw = [function () { markRendered(el, xs.length); }];
    var series = Array.isArray(ys[0]) ? ys : [ys];
    charts.push([el, new uPlot(options, [xs].concat(series), el)]);
  }

  // One bar split by status, each part as wide as its share of all jobs: readable whatever
  // the counts, where a bar chart of them would be all "succeeded". Built with the DOM and
  // sized through the CSSOM, which the page's Content-Security-Policy allows.
  function drawStatuses() {
    var el = document.getElementById("chart-statuses");
    var total = data.statuses.reduce(function (sum, row) { return sum + row.jobs; }, 0);
    data.statuses.forEach(function (row) {
      if (!row.jobs) return;
      var part = document.createElement("span");
      part.className = "status-part status-" + row.status;
      part.style.flexGrow = String(row.jobs);
      part.title = row.status + ": " + row.jobs.toLocaleString() + " (" +
        (100 * row.jobs / total).toFixed(1) + "%)";
      el.appendChild(part);
    });
    markRendered(el, data.statuses.length);
  }

  function drawDays() {
    var el = document.getElementById("chart-days");
    var days = data.spend_by_day.days;
    var half = 12 * 3600;
    chart(el, {
      // The report's days are UTC days: label them so, whatever the browser's time zone.
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); },
      scales: {
        x: { time: true, range: function (u, min, max) { return [min - half, max + half]; } },
        y: { range: zeroBased },
      },
      axes: [
        { values: "{MMM} {D}", size: 32, grid: { show: false } },
        { values: dollarTicks, size: 60, grid: { stroke: "#eef0f4" } },
      ],
      series: [
        {},
        {
          label: "spend", fill: ACCENT, stroke: ACCENT, points: { show: false },
          paths: uPlot.paths.bars({ size: [0.7, 40], radius: 0.1 }),
        },
      ],
      hooks: {
        setCursor: [readout("readout-days", function (i) { return days[i].day + ": " + describe(days[i]); })],
      },
    },
    days.map(function (d) { return Date.parse(d.day + "T00:00:00Z") / 1000; }),
    days.map(function (d) { return Number(d.cost); }));
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
    var xs = rows.map(function (_, i) { return i; });
    var colors = rows.map(function (_, i) { return PALETTE[i % PALETTE.length]; });
    var room = el.clientWidth / rows.length;
    chart(el, {
      scales: { x: { time: false, range: [-0.5, rows.length - 0.5] }, y: { range: zeroBased } },
      axes: [
        {
          splits: function () { return xs; },
          values: function (u, splits) {
            return splits.map(function (i) { return rows[i] ? shorten(rows[i].model, room) : ""; });
          },
          size: 32,
          grid: { show: false },
          ticks: { show: false },
        },
        { values: dollarTicks, size: 60, grid: { stroke: "#eef0f4" } },
      ],
      series: [
        {},
        {
          // width 0: uPlot colours each bar from disp.fill only when the bars have no outline.
          label: "spend", fill: ACCENT, width: 0, points: { show: false },
          paths: uPlot.paths.bars({
            size: [0.6, 90],
            radius: 0.06,
            disp: { fill: { unit: 3, values: function () { return colors; } } },
          }),
        },
      ],
      hooks: {
        setCursor: [readout("readout-models", function (i) { return rows[i].model + ": " + describe(rows[i]); })],
      },
    }, xs, rows.map(function (r) { return Number(r.cost); }));
  }

  function hourStamps() {
    return data.hours.map(function (h) { return Date.parse(h.hour) / 1000; });
  }

  function hourLabel(h) { return h.hour.slice(11, 16) + " UTC"; }

  var UTC = function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); };

  // Finished jobs per hour: the whole bar is every job, its red foot the failed ones.
  function drawHours() {
    var el = document.getElementById("chart-hours");
    var hours = data.hours;
    var half = 1800;
    var bars = uPlot.paths.bars({ size: [0.7, 30], radius: 0.1 });
    chart(el, {
      tzDate: UTC,
      scales: {
        x: { time: true, range: function (u, min, max) { return [min - half, max + half]; } },
        y: { range: zeroBased },
      },
      axes: [
        { values: "{HH}:{mm}", size: 32, grid: { show: false } },
        { size: 50, grid: { stroke: "#eef0f4" } },
      ],
      series: [
        {},
        { label: "finished", fill: ACCENT, stroke: ACCENT, points: { show: false }, paths: bars },
        { label: "failed", fill: RED, stroke: RED, points: { show: false }, paths: bars },
      ],
      hooks: {
        setCursor: [readout("readout-hours", function (i) {
          var h = hours[i];
          return hourLabel(h) + ": " + (h.succeeded + h.failed).toLocaleString() + " finished, " +
            h.succeeded.toLocaleString() + " succeeded, " + h.failed.toLocaleString() + " failed or canceled";
        })],
      },
    }, hourStamps(), [
      hours.map(function (h) { return h.succeeded + h.failed; }),
      hours.map(function (h) { return h.failed; }),
    ]);
  }

  function drawLatency() {
    var el = document.getElementById("chart-latency");
    var hours = data.hours;
    chart(el, {
      tzDate: UTC,
      scales: { x: { time: true }, y: { range: zeroBased } },
      axes: [
        { values: "{HH}:{mm}", size: 32, grid: { show: false } },
        { size: 50, grid: { stroke: "#eef0f4" }, values: function (u, splits) {
          return splits.map(function (v) { return v + " s"; });
        } },
      ],
      series: [
        {},
        { label: "p50", stroke: ACCENT, width: 2, points: { show: true, size: 8, fill: ACCENT }, spanGaps: false },
        { label: "p95", stroke: AMBER, width: 2, points: { show: true, size: 8, fill: AMBER }, spanGaps: false },
      ],
      hooks: {
        setCursor: [readout("readout-latency", function (i) {
          var h = hours[i];
          return h.p50_seconds == null ? hourLabel(h) + ": no job finished" :
            hourLabel(h) + ": median " + h.p50_seconds + " s, 95th percentile " + h.p95_seconds + " s";
        })],
      },
    }, hourStamps(), [
      hours.map(function (h) { return h.p50_seconds; }),
      hours.map(function (h) { return h.p95_seconds; }),
    ]);
  }

  drawStatuses();
  drawDays();
  drawModels();
  drawHours();
  drawLatency();

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
