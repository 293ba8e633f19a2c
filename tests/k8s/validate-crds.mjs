// Validates the custom-resource documents of Kubernetes manifests and sets the core ones aside for
// kubernetes-validate. Run by scripts/validate-manifests.sh:
//
//   node tests/k8s/validate-crds.mjs --core-dir DIR --summary FILE [LABEL=]FILE...
//
// Every document of every FILE is either
//   - a CRD object this script knows (KEDA, cert-manager, prometheus-operator): validated here with
//     the @kubernetes-models schema (`.validate()` throws on a schema error), plus stricter checks
//     the CRD schemas do not make (unknown fields in ScaledObject/ScaledJob specs and triggers,
//     scalerAddress and the allowed metadata keys of external scaler triggers), or
//   - anything else: its text is written unchanged to DIR/<file>.yaml for
//     `kubernetes-validate --strict`, which fails on kinds it has no schema for.
// A document of a known CRD group but an unknown kind, or without apiVersion/kind, fails here.
// FILE's counts go to the JSON summary FILE: {"crd": C, "core": K, "coreFiles": [...]}.
// Exit status 1 when any document failed.

import fs from "node:fs";
import path from "node:path";
import yaml from "js-yaml";
import * as keda from "@kubernetes-models/keda/keda.sh/v1alpha1";
import * as certManager from "@kubernetes-models/cert-manager/cert-manager.io/v1";
import * as monitoring from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const MODELS = {
  "keda.sh/v1alpha1": {
    ScaledObject: keda.ScaledObject,
    ScaledJob: keda.ScaledJob,
    TriggerAuthentication: keda.TriggerAuthentication,
    ClusterTriggerAuthentication: keda.ClusterTriggerAuthentication,
  },
  "cert-manager.io/v1": {
    Certificate: certManager.Certificate,
    Issuer: certManager.Issuer,
    ClusterIssuer: certManager.ClusterIssuer,
  },
  "monitoring.coreos.com/v1": {
    ServiceMonitor: monitoring.ServiceMonitor,
    PodMonitor: monitoring.PodMonitor,
    PrometheusRule: monitoring.PrometheusRule,
  },
};
// API groups whose kinds must all be known here (kubernetes-validate has no schema for them).
const CRD_GROUPS = new Set(["keda.sh", "eventing.keda.sh", "cert-manager.io", "acme.cert-manager.io", "monitoring.coreos.com"]);
const CLUSTER_SCOPED = new Set(["ClusterTriggerAuthentication", "ClusterIssuer"]);

// The KEDA CRD schemas accept unknown fields (the API server would prune them silently), so a typo
// like `pollingInteval` would pass. These are the fields of keda.sh/v1alpha1 (KEDA 2.17).
const TOP_LEVEL = new Set(["apiVersion", "kind", "metadata", "spec"]);
const SPEC_FIELDS = {
  ScaledObject: new Set(["scaleTargetRef", "pollingInterval", "initialCooldownPeriod", "cooldownPeriod",
    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "advanced", "fallback", "triggers"]),
  ScaledJob: new Set(["jobTargetRef", "pollingInterval", "successfulJobsHistoryLimit", "failedJobsHistoryLimit",
    "envSourceContainerName", "minReplicaCount", "maxReplicaCount", "rolloutStrategy", "rollout",
    "scalingStrategy", "triggers"]),
};
const SCALE_TARGET_FIELDS = new Set(["name", "kind", "apiVersion", "envSourceContainerName"]);
const FALLBACK_FIELDS = new Set(["failureThreshold", "replicas", "behavior"]);
const TRIGGER_FIELDS = new Set(["type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"]);
const AUTH_REF_FIELDS = new Set(["name", "kind"]);

// Trigger metadata of `external` / `external-push` triggers: what KEDA itself reads (scalerAddress,
// enableTLS, unsafeSsl) plus the keys celery-keda-scaler accepts.
const KEDA_EXTERNAL_KEYS = ["scalerAddress", "enableTLS", "unsafeSsl"];
const SCALER_KEYS = ["brokerUrl", "brokerUrlFromEnv", "broker", "queues", "queueLength", "activationQueueLength",
  "scaleOnInFlight", "scaleOnRunning", "metricName", "globalKeyprefix", "prioritySteps", "separator",
  "sentinelMaster", "managementUrl", "vhost", "queueNamePrefix", "awsRegion", "awsEndpoint"];
const EXTERNAL_METADATA_KEYS = new Set([...KEDA_EXTERNAL_KEYS, ...SCALER_KEYS]);
const EXTERNAL_TYPES = new Set(["external", "external-push"]);

function usage(message) {
  if (message) console.error(`validate-crds: ${message}`);
  console.error("usage: node validate-crds.mjs --core-dir DIR --summary FILE [LABEL=]FILE...");
  process.exit(2);
}

const args = process.argv.slice(2);
let coreDir = null;
let summaryFile = null;
const inputs = [];
while (args.length > 0) {
  const arg = args.shift();
  if (arg === "--core-dir") coreDir = args.shift();
  else if (arg === "--summary") summaryFile = args.shift();
  else if (arg === "--") inputs.push(...args.splice(0));
  else if (arg.startsWith("--")) usage(`unknown option ${arg}`);
  else inputs.push(arg);
}
if (!coreDir || !summaryFile || inputs.length === 0) usage();
fs.mkdirSync(coreDir, { recursive: true });

const failures = [];
let crdCount = 0;
let coreCount = 0;
const coreFiles = [];

function unknownKeys(object, allowed) {
  if (!object || typeof object !== "object" || Array.isArray(object)) return [];
  return Object.keys(object).filter((key) => !allowed.has(key));
}

// Checks the CRD schemas do not make. Returns a list of messages.
function strictChecks(doc) {
  const problems = [];
  const extra = (where, keys) => {
    if (keys.length > 0) problems.push(`${where}: unknown field(s) ${keys.map((k) => JSON.stringify(k)).join(", ")}`);
  };
  extra("top level", unknownKeys(doc, TOP_LEVEL));
  if (CLUSTER_SCOPED.has(doc.kind) && doc.metadata && doc.metadata.namespace !== undefined) {
    problems.push(`metadata.namespace: ${doc.kind} is cluster-scoped and takes no namespace`);
  }
  if (doc.apiVersion !== "keda.sh/v1alpha1" || !SPEC_FIELDS[doc.kind]) return problems;
  const spec = doc.spec || {};
  extra("spec", unknownKeys(spec, SPEC_FIELDS[doc.kind]));
  if (doc.kind === "ScaledObject") {
    extra("spec.scaleTargetRef", unknownKeys(spec.scaleTargetRef, SCALE_TARGET_FIELDS));
    extra("spec.fallback", unknownKeys(spec.fallback, FALLBACK_FIELDS));
  }
  (Array.isArray(spec.triggers) ? spec.triggers : []).forEach((trigger, i) => {
    const where = `spec.triggers[${i}]`;
    extra(where, unknownKeys(trigger, TRIGGER_FIELDS));
    extra(`${where}.authenticationRef`, unknownKeys(trigger.authenticationRef, AUTH_REF_FIELDS));
    if (!EXTERNAL_TYPES.has(trigger.type)) return;
    const metadata = trigger.metadata || {};
    if (typeof metadata.scalerAddress !== "string" || metadata.scalerAddress.trim() === "") {
      problems.push(`${where} (type ${trigger.type}): metadata.scalerAddress is missing`);
    }
    const unknown = unknownKeys(metadata, EXTERNAL_METADATA_KEYS);
    if (unknown.length > 0) {
      problems.push(`${where}.metadata: key(s) ${unknown.map((k) => JSON.stringify(k)).join(", ")} are neither `
        + `celery-keda-scaler keys nor keys KEDA reads (${KEDA_EXTERNAL_KEYS.join(", ")})`);
    }
  });
  return problems;
}

function describe(doc) {
  const name = doc && doc.metadata && doc.metadata.name ? doc.metadata.name : "<no name>";
  return `${doc && doc.kind ? doc.kind : "<no kind>"}/${name}`;
}

// Splits a multi-document YAML text at `---` lines, keeping each document's text unchanged (so
// kubernetes-validate parses exactly what kubectl would).
function splitDocuments(text) {
  return text.split(/^---[ \t]*(?:#.*)?$/m);
}

for (const input of inputs) {
  const eq = input.indexOf("=");
  const label = eq > 0 ? input.slice(0, eq) : input;
  const file = eq > 0 ? input.slice(eq + 1) : input;
  let text;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (error) {
    failures.push(`${label}: cannot read ${file}: ${error.message}`);
    continue;
  }
  const coreChunks = [];
  let index = 0;
  for (const chunk of splitDocuments(text)) {
    let doc;
    try {
      doc = yaml.load(chunk);
    } catch (error) {
      failures.push(`${label}: YAML error: ${error.message.split("\n")[0]}`);
      continue;
    }
    if (doc === undefined || doc === null) continue; // empty or comment-only
    index += 1;
    const where = `${label} #${index} ${describe(doc)}`;
    if (typeof doc !== "object" || Array.isArray(doc) || typeof doc.apiVersion !== "string" || typeof doc.kind !== "string") {
      failures.push(`${where}: not a Kubernetes object (apiVersion and kind are required)`);
      continue;
    }
    const group = doc.apiVersion.includes("/") ? doc.apiVersion.split("/")[0] : "";
    const Model = (MODELS[doc.apiVersion] || {})[doc.kind];
    if (!Model) {
      if (CRD_GROUPS.has(group)) {
        failures.push(`${where}: unknown kind ${doc.kind} in ${doc.apiVersion} (known: ${Object.keys(MODELS[doc.apiVersion] || {}).join(", ") || "none for this version"})`);
      } else {
        coreChunks.push(chunk.replace(/^\s*\n/, ""));
        coreCount += 1;
      }
      continue;
    }
    const problems = [];
    try {
      new Model(doc).validate();
    } catch (error) {
      problems.push(`schema: ${error.message}`);
    }
    problems.push(...strictChecks(doc));
    if (problems.length > 0) {
      for (const problem of problems) failures.push(`${where}: ${problem}`);
    } else {
      crdCount += 1;
      console.log(`ok   ${where} (CRD schema ${doc.apiVersion})`);
    }
  }
  if (coreChunks.length > 0) {
    const name = label.replace(/[^A-Za-z0-9._-]+/g, "_").replace(/^_+/, "") || "input";
    const target = path.join(coreDir, `${String(coreFiles.length + 1).padStart(2, "0")}-${name}`.replace(/(\.ya?ml)?$/, ".yaml"));
    fs.writeFileSync(target, coreChunks.map((c) => c.trimEnd() + "\n").join("---\n"));
    coreFiles.push({ label, file: target, documents: coreChunks.length });
  }
}

fs.writeFileSync(summaryFile, JSON.stringify({ crd: crdCount, core: coreCount, coreFiles }, null, 2));
for (const failure of failures) console.error(`FAIL ${failure}`);
if (failures.length > 0) {
  console.error(`validate-crds: ${failures.length} problem(s)`);
  process.exit(1);
}
