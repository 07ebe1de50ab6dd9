// Validate custom resources against the schemas of their CRDs (the @kubernetes-models packages
// are generated from the published CRDs). Reads a JSON array of objects on stdin; prints a JSON
// array of {kind, name, problem} (problem null when valid) for the kinds it knows.
//   node scripts/check_crds.mjs < objects.json     (run by scripts/check_k8s.py)
import path from "node:path";
import { pathToFileURL } from "node:url";

const modules = path.resolve(process.env.TUNESHIP_NPM_MODULES ?? ".venv/lint/npm/node_modules");
const model = async (pkg, file, name) =>
  (await import(pathToFileURL(path.join(modules, "@kubernetes-models", pkg)).href + "/" + file))[name];
const v1 = "prometheus-operator/monitoring.coreos.com/v1";
const models = {
  "monitoring.coreos.com/v1/ServiceMonitor": await model(v1, "ServiceMonitor.js", "ServiceMonitor"),
  "monitoring.coreos.com/v1/PrometheusRule": await model(v1, "PrometheusRule.js", "PrometheusRule"),
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = [];
for (const doc of JSON.parse(input)) {
  const Model = models[`${doc.apiVersion}/${doc.kind}`];
  if (!Model) continue;
  let problem = null;
  try {
    new Model(doc).validate();
  } catch (error) {
    problem = error.message;
  }
  results.push({ kind: doc.kind, name: doc.metadata.name, problem });
}
console.log(JSON.stringify(results));
