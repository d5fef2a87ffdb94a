// Validates every document of a manifest file against its Kubernetes / KEDA CRD schema, using
// the JSON schemas that the kubernetes-models packages generate from the upstream OpenAPI specs
// (KEDA's from its CustomResourceDefinitions). Usage: node validate.mjs FILE [FILE ...]
// Documents are separated by lines of "---"; each is JSON (valid YAML). Exit 1 on any error.
import { readFileSync } from "node:fs";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { Deployment } from "kubernetes-models/apps/v1/Deployment";

const models = { "keda.sh/v1alpha1/ScaledObject": ScaledObject, "apps/v1/Deployment": Deployment };
let failures = 0;
let checked = 0;
for (const file of process.argv.slice(2)) {
  const docs = readFileSync(file, "utf8").split(/^---$/m).map((d) => d.trim())
    .filter((d) => d && !d.split("\n").every((l) => l.startsWith("#")));
  for (const raw of docs) {
    const text = raw.split("\n").filter((l) => !l.startsWith("#")).join("\n");
    const doc = JSON.parse(text);
    const key = `${doc.apiVersion}/${doc.kind}`;
    const Model = models[key];
    const name = `${file}: ${key} ${doc.metadata?.name}`;
    if (!Model) {
      console.log(`FAIL ${name}: no schema for ${key}`);
      failures++;
      continue;
    }
    try {
      new Model(doc).validate();
      console.log(`ok   ${name}`);
    } catch (err) {
      console.log(`FAIL ${name}: ${err.message}`);
      failures++;
    }
    checked++;
  }
}
console.log(`${checked} checked, ${failures} failed`);
process.exit(failures ? 1 : 0);
