"use strict";
// /docs: every route of /openapi.json with its parameters, request body and answers, drawn with text nodes
// only (nothing from the description is parsed as HTML), from this server alone (no CDN, works offline).
const api = document.getElementById("api");

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function limits(schema) {
  const parts = [];
  if (schema.type) parts.push(schema.type);
  if (schema.minimum !== undefined) parts.push(`≥ ${schema.minimum}`);
  if (schema.maximum !== undefined) parts.push(`≤ ${schema.maximum}`);
  if (schema.default !== undefined) parts.push(`default ${schema.default}`);
  return parts.join(", ");
}

function operation(path, method, spec) {
  const section = element("section", undefined, "operation");
  section.append(element("h2", `${method.toUpperCase()} ${path}`));
  if (spec.summary) section.append(element("p", spec.summary));
  if (spec.description && spec.description !== spec.summary) section.append(element("p", spec.description, "muted"));
  const parameters = spec.parameters || [];
  if (parameters.length) {
    const list = element("ul");
    for (const parameter of parameters) {
      const schema = parameter.schema || {};
      list.append(element("li", `${parameter.name} (${parameter.in}; ${limits(schema)})` +
        (parameter.description ? `: ${parameter.description}` : "")));
    }
    section.append(element("h3", "Parameters"), list);
  }
  if (spec.requestBody) {
    section.append(element("h3", "Body"), element("p", Object.keys(spec.requestBody.content || {}).join(" or ")));
  }
  const answers = element("ul");
  for (const [status, answer] of Object.entries(spec.responses || {})) {
    answers.append(element("li", `${status}: ${answer.description || ""}`));
  }
  section.append(element("h3", "Answers"), answers,
    element("p", "Every refusal is JSON {\"error\": \"...\"} with a 4xx status.", "muted"));
  return section;
}

fetch("/openapi.json").then((response) => response.json()).then((spec) => {
  api.textContent = "";
  api.append(element("p", `${spec.info.title} ${spec.info.version}: ${spec.info.description || ""}`));
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, detail] of Object.entries(methods)) api.append(operation(path, method, detail));
  }
}).catch((error) => { api.textContent = `cannot read /openapi.json (${error})`; });
