"use strict";
// The page: send the picked or dropped image to POST /predict, show the top 5 with bars, and lay the predicted
// class's confidence map (h×w values) over the photo, upsampled to the photo's own resolution.
const fileInput = document.getElementById("file");
const drop = document.getElementById("drop");
const statusLine = document.getElementById("status");
const result = document.getElementById("result");
const photo = document.getElementById("photo");
const overlay = document.getElementById("overlay");
const caption = document.getElementById("caption");
const topList = document.getElementById("top");
const invert = document.getElementById("invert");
let lastFile = null;
let latest = 0;  // the newest request: an older answer arriving after it is dropped

fetch("/health").then((r) => r.json()).then((health) => {
  const [c, h, w] = health.input;
  document.getElementById("model").textContent =
    `${health.dataset}: ${health.classes.length} classes, ${c}×${h}×${w} input` + (health.tta_flip ? ", flip-averaged" : "");
  // MNIST-style weights (light on black): offer to invert dark ink on paper, as `nin predict --invert`
  document.getElementById("invert-row").hidden = !health.light_on_dark;
});
invert.addEventListener("change", () => { if (lastFile) classify(lastFile); });

drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) classify(event.dataTransfer.files[0]);
});
fileInput.addEventListener("change", () => { if (fileInput.files.length) classify(fileInput.files[0]); });

function say(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

async function classify(file) {
  lastFile = file;
  const request = ++latest, inverted = invert.checked;
  say(`Classifying ${file.name}…`);
  const body = new FormData();
  body.append("file", file);
  let response, answer;
  try {
    response = await fetch(`/predict?invert=${inverted}`, { method: "POST", body });
    answer = await response.json();
  } catch (error) {
    if (request === latest) say("The server did not answer.", true);
    return;
  }
  if (request !== latest) return;
  if (!response.ok) {
    result.hidden = true;
    say(answer.error, true);
    return;
  }
  await showPhoto(file);
  if (request !== latest) return;
  showTop(answer.top);
  drawMap(answer.confidence_map);
  result.hidden = false;
  // the server's hint means the image looks the other way round from what the weights (and the box) expect
  const advice = inverted ? "it looks light on dark already: untick “dark ink on light paper”"
                           : "it looks dark on light: tick “dark ink on light paper”";
  say(`${file.name}: ${answer.top[0].class}` + (answer.hint ? ` (${advice})` : ""));
}

function showPhoto(file) {
  return new Promise((resolve) => {
    if (photo.src) URL.revokeObjectURL(photo.src);
    photo.onload = () => { photo.classList.toggle("small", photo.naturalWidth < 160); resolve(); };
    photo.onerror = resolve;
    photo.src = URL.createObjectURL(file);
  });
}

function showTop(top) {
  topList.replaceChildren(...top.map((item) => {
    const row = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = item.class;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(100 * item.probability).toFixed(1)}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "probability";
    value.textContent = `${(100 * item.probability).toFixed(1)}%`;
    row.append(name, bar, value);
    return row;
  }));
}

function heat(t) {  // dark red -> orange -> yellow, transparent where the map is low
  return [Math.round(255 * Math.min(1, 0.35 + 1.3 * t)), Math.round(255 * Math.max(0, 1.6 * t - 0.6)), 0, Math.round(190 * t)];
}

function drawMap(map) {
  const [rows, columns] = map.size;
  const values = map.values.flat();
  const low = Math.min(...values), span = Math.max(...values) - low || 1;
  const small = document.createElement("canvas");
  small.width = columns;
  small.height = rows;
  const cells = small.getContext("2d").createImageData(columns, rows);
  values.forEach((v, i) => cells.data.set(heat((v - low) / span), 4 * i));
  small.getContext("2d").putImageData(cells, 0, 0);
  // The map covers the centre square the model saw (map.box, in the photo's pixels): upsample it there.
  overlay.width = photo.naturalWidth;
  overlay.height = photo.naturalHeight;
  const context = overlay.getContext("2d");
  context.clearRect(0, 0, overlay.width, overlay.height);
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high";
  context.drawImage(small, map.box.left, map.box.top, map.box.width, map.box.height);
  caption.textContent = `Confidence map of “${map.class}” (${rows}×${columns}), over the part of the photo the model saw.`;
}
