package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
	"github.com/celery-keda-scaler/e2e/keda/harness"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// The chart, its CI value sets and the values for KEDA's own chart (sidecar shape).
const (
	chartRel        = "deploy/helm/celery-keda-scaler"
	chartCIRel      = "deploy/helm/ci"
	kedaSidecarRel  = "deploy/helm/keda-sidecar-values.yaml"
	chartName       = "celery-keda-scaler"
	kedaChartModule = "github.com/kedacore/charts"
)

// helmBin is the Helm binary e2e/scripts/build.sh built from e2e/helm/go.mod; a missing one fails.
func helmBin(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(os.Getenv("CKS_E2E_BIN"), "helm")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("Helm is not built (%v): run `bash e2e/scripts/build.sh` (or the suite through e2e/scripts/run.sh), which builds it from e2e/helm/go.mod", err)
	}
	return bin
}

// helm runs Helm against the suite's API server, with its caches and configuration in a temporary
// directory (nothing is written to the user's home).
func helm(t *testing.T, args ...string) ([]byte, error) {
	t.Helper()
	home := t.TempDir()
	cmd := exec.Command(helmBin(t), args...)
	cmd.Dir = harness.RepoRoot
	cmd.Env = append(os.Environ(), "KUBECONFIG="+harness.Kube.Kubeconfig, "HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"), "HELM_DATA_HOME="+filepath.Join(home, "data"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("helm %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return out, nil
}

// helmTemplate renders a chart (relative to the repository, or absolute) into objects.
func helmTemplate(t *testing.T, release, ns, chart string, args ...string) []*unstructured.Unstructured {
	t.Helper()
	out, err := helm(t, append([]string{"template", release, chart, "--namespace", ns}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := cluster.DecodeYAML(out)
	if err != nil {
		t.Fatalf("helm template %s %v: %v", chart, args, err)
	}
	return objs
}

// valueSets lists deploy/helm/ci/*-values.yaml by set name ("tls-cert-manager" for
// tls-cert-manager-values.yaml).
func valueSets(t *testing.T) map[string]string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(harness.RepoRoot, chartCIRel, "*-values.yaml"))
	sets := map[string]string{}
	for _, f := range files {
		sets[strings.TrimSuffix(filepath.Base(f), "-values.yaml")] = f
	}
	return sets
}

func objectNames(objs []*unstructured.Unstructured) []string {
	var names []string
	for _, o := range objs {
		names = append(names, o.GetKind()+"/"+o.GetName())
	}
	sort.Strings(names)
	return names
}

func byKind(t *testing.T, objs []*unstructured.Unstructured, kind string) *unstructured.Unstructured {
	t.Helper()
	var found *unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() == kind {
			if found != nil {
				t.Fatalf("more than one %s: %s and %s", kind, found.GetName(), o.GetName())
			}
			found = o
		}
	}
	if found == nil {
		t.Fatalf("no %s among %v", kind, objectNames(objs))
	}
	return found
}

// chartCRDs installs the cert-manager and Prometheus Operator CRDs the chart's objects need, from
// the modules pinned in e2e/crds (KEDA's are installed with KEDA).
func chartCRDs(t *testing.T) {
	t.Helper()
	certManager := harness.ModuleDir(t, "../crds", "github.com/cert-manager/cert-manager")
	promOperator := harness.ModuleDir(t, "../crds", "github.com/prometheus-operator/prometheus-operator")
	crds, _ := filepath.Glob(filepath.Join(certManager, "deploy", "crds", "cert-manager.io_*.yaml"))
	for _, name := range []string{"servicemonitors", "prometheusrules"} {
		crds = append(crds, filepath.Join(promOperator, "example", "prometheus-operator-crd", "monitoring.coreos.com_"+name+".yaml"))
	}
	harness.InstallCRDs(t, crds...)
}

// TestHelmChartApply: the chart rendered with its defaults and with every value set of
// deploy/helm/ci renders exactly the expected objects, and the API server accepts every one of
// them (server-side apply, strict field validation, with KEDA's, cert-manager's and the Prometheus
// Operator's CRDs installed).
func TestHelmChartApply(t *testing.T) {
	t.Parallel()
	chartCRDs(t)
	base := func(f string) []string {
		return []string{"Deployment/" + f, "PodDisruptionBudget/" + f, "Service/" + f, "ServiceAccount/" + f}
	}
	with := func(names []string, more ...string) []string {
		out := append(append([]string(nil), names...), more...)
		sort.Strings(out)
		return out
	}
	want := map[string]func(f string) []string{
		"defaults": base,
		"default":  base,
		"tls-cert-manager": func(f string) []string {
			return with(base(f), "Issuer/"+f+"-selfsigned", "Certificate/"+f+"-ca", "Issuer/"+f+"-ca",
				"Certificate/"+f+"-tls", "Certificate/"+f+"-client", "ClusterTriggerAuthentication/"+f+"-tls")
		},
		"tls-secret": func(f string) []string { return with(base(f), "ClusterTriggerAuthentication/corp-scaler") },
		"tenancy":    func(f string) []string { return with(base(f), "NetworkPolicy/"+f) },
		"monitoring": func(f string) []string {
			return with(base(f), "ServiceMonitor/"+f, "PrometheusRule/"+f, "ConfigMap/"+f+"-dashboard")
		},
		"everything": func(string) []string {
			return with([]string{"Deployment/cks", "PodDisruptionBudget/cks", "Service/cks", "ServiceAccount/cks-scaler"},
				"Certificate/cks-tls", "Certificate/cks-client", "ClusterTriggerAuthentication/cks-mtls",
				"NetworkPolicy/cks", "ServiceMonitor/cks", "PrometheusRule/cks", "ConfigMap/cks-dashboard")
		},
	}
	sets := valueSets(t)
	sets["defaults"] = ""
	if len(sets) != len(want) {
		t.Fatalf("value sets in %s: %v; this test knows %d (add the new set's expected objects here)", chartCIRel, sets, len(want)-1)
	}
	total := 0
	for name, file := range sets {
		expect, ok := want[name]
		if !ok {
			t.Fatalf("%s: no expected objects for this value set in the test", file)
		}
		// Each set its own namespace and release (cluster-scoped names differ too).
		release := chartName + "-" + name
		ns := harness.Namespace(t, "helm-"+name)
		var args []string
		if file != "" {
			args = []string{"-f", file}
		}
		objs := helmTemplate(t, release, ns, chartRel, args...)
		if got, w := objectNames(objs), expect(release); !reflect.DeepEqual(got, w) {
			t.Errorf("value set %s renders %v, want %v", name, got, w)
		}
		total += harness.ApplyAll(t, "helm template "+name, ns, objs)
	}
	t.Logf("the API server accepted %d objects from %d value sets", total, len(sets))
}

// TestHelmMatchesKustomize: the chart's default render and deploy/base agree on what matters for
// running the scaler (container, probes, security contexts, ports, Service ports, PDB, account), and
// so do the chart with TLS from a Secret and deploy/overlays/tls, the chart's NetworkPolicy and
// ServiceMonitor and deploy/components. Only the selector labels differ (the chart adds
// app.kubernetes.io/instance so that two releases never select each other's pods).
func TestHelmMatchesKustomize(t *testing.T) {
	t.Parallel()
	chart := helmTemplate(t, chartName, "keda", chartRel, "--set", "networkPolicy.enabled=true,serviceMonitor.enabled=true")
	kust := harness.Kustomize(t, filepath.Join(harness.RepoRoot, "tests", "k8s", "components"))
	same := func(what string, a, b *unstructured.Unstructured, path ...string) {
		t.Helper()
		va, _, _ := unstructured.NestedFieldNoCopy(a.Object, path...)
		vb, _, _ := unstructured.NestedFieldNoCopy(b.Object, path...)
		if va == nil || !reflect.DeepEqual(va, vb) {
			ja, _ := json.Marshal(va)
			jb, _ := json.Marshal(vb)
			t.Errorf("%s %s: the chart has %s, Kustomize has %s", what, strings.Join(path, "."), ja, jb)
		}
	}
	compareDeployments := func(what string, chartDep, kustDep *unstructured.Unstructured) {
		t.Helper()
		for _, p := range [][]string{
			{"spec", "replicas"}, {"spec", "revisionHistoryLimit"}, {"spec", "strategy"},
			{"spec", "template", "metadata", "annotations"},
			{"spec", "template", "spec", "automountServiceAccountToken"}, {"spec", "template", "spec", "enableServiceLinks"},
			{"spec", "template", "spec", "terminationGracePeriodSeconds"}, {"spec", "template", "spec", "securityContext"},
			{"spec", "template", "spec", "serviceAccountName"},
		} {
			same(what, chartDep, kustDep, p...)
		}
		// Volumes (TLS): the same Secret, mode and name.
		cv, _, _ := unstructured.NestedSlice(chartDep.Object, "spec", "template", "spec", "volumes")
		kv, _, _ := unstructured.NestedSlice(kustDep.Object, "spec", "template", "spec", "volumes")
		if !reflect.DeepEqual(cv, kv) {
			t.Errorf("%s volumes: the chart has %v, Kustomize has %v", what, cv, kv)
		}
		cc, _, _ := unstructured.NestedSlice(chartDep.Object, "spec", "template", "spec", "containers")
		kc, _, _ := unstructured.NestedSlice(kustDep.Object, "spec", "template", "spec", "containers")
		if len(cc) != 1 || len(kc) != 1 {
			t.Fatalf("%s: containers %d (chart) and %d (Kustomize), want 1 each", what, len(cc), len(kc))
		}
		a, b := cc[0].(map[string]any), kc[0].(map[string]any)
		// The order of env entries carries no meaning here (no $(VAR) references): Kustomize's
		// strategic merge puts an overlay's entries first, the chart appends them.
		for _, m := range []map[string]any{a, b} {
			if env, ok := m["env"].([]any); ok {
				sort.Slice(env, func(i, j int) bool {
					return env[i].(map[string]any)["name"].(string) < env[j].(map[string]any)["name"].(string)
				})
			}
		}
		keys := map[string]bool{}
		for k := range a {
			keys[k] = true
		}
		for k := range b {
			keys[k] = true
		}
		for k := range keys {
			if !reflect.DeepEqual(a[k], b[k]) {
				ja, _ := json.Marshal(a[k])
				jb, _ := json.Marshal(b[k])
				t.Errorf("%s container field %s: the chart has %s, Kustomize has %s", what, k, ja, jb)
			}
		}
		// Spread: the same constraint, the chart's selector adding the instance label.
		cs, _, _ := unstructured.NestedSlice(chartDep.Object, "spec", "template", "spec", "topologySpreadConstraints")
		ks, _, _ := unstructured.NestedSlice(kustDep.Object, "spec", "template", "spec", "topologySpreadConstraints")
		if len(cs) != 1 || len(ks) != 1 {
			t.Fatalf("%s: %d and %d topology spread constraints, want 1 each", what, len(cs), len(ks))
		}
		c0, k0 := cs[0].(map[string]any), ks[0].(map[string]any)
		for _, k := range []string{"maxSkew", "topologyKey", "whenUnsatisfiable"} {
			if !reflect.DeepEqual(c0[k], k0[k]) {
				t.Errorf("%s topology spread %s: chart %v, Kustomize %v", what, k, c0[k], k0[k])
			}
		}
	}
	compareDeployments("Deployment", byKind(t, chart, "Deployment"), byKind(t, kust, "Deployment"))
	same("Service", byKind(t, chart, "Service"), byKind(t, kust, "Service"), "spec", "ports")
	same("Service", byKind(t, chart, "Service"), byKind(t, kust, "Service"), "spec", "type")
	same("PodDisruptionBudget", byKind(t, chart, "PodDisruptionBudget"), byKind(t, kust, "PodDisruptionBudget"), "spec", "minAvailable")
	same("ServiceAccount", byKind(t, chart, "ServiceAccount"), byKind(t, kust, "ServiceAccount"), "automountServiceAccountToken")
	same("NetworkPolicy", byKind(t, chart, "NetworkPolicy"), byKind(t, kust, "NetworkPolicy"), "spec", "ingress")
	same("NetworkPolicy", byKind(t, chart, "NetworkPolicy"), byKind(t, kust, "NetworkPolicy"), "spec", "policyTypes")
	same("ServiceMonitor", byKind(t, chart, "ServiceMonitor"), byKind(t, kust, "ServiceMonitor"), "spec", "endpoints")
	same("ServiceMonitor", byKind(t, chart, "ServiceMonitor"), byKind(t, kust, "ServiceMonitor"), "spec", "namespaceSelector")
	for _, o := range chart {
		if o.GetName() != chartName {
			t.Errorf("the chart's default render names %s %s, deploy/base names everything %s", o.GetKind(), o.GetName(), chartName)
		}
	}

	// TLS from an existing Secret = deploy/overlays/tls.
	chartTLS := helmTemplate(t, chartName, "keda", chartRel, "--set",
		"tls.enabled=true,tls.existingSecret=celery-keda-scaler-tls,tls.triggerAuthentication.create=false")
	kustTLS := harness.Kustomize(t, filepath.Join(harness.RepoRoot, "deploy", "overlays", "tls"))
	compareDeployments("Deployment with TLS", byKind(t, chartTLS, "Deployment"), byKind(t, kustTLS, "Deployment"))
	same("Service with TLS", byKind(t, chartTLS, "Service"), byKind(t, kustTLS, "Service"), "spec", "ports")
}

// TestHelmInstallUpgradeUninstall: `helm install` of the defaults into the real control plane
// creates the four objects of deploy/base; `helm upgrade` with TLS from a Secret changes the
// Deployment (TLS files, HTTP probes) and the Service and adds the ClusterTriggerAuthentication;
// `helm uninstall` removes every object and Helm's release record.
func TestHelmInstallUpgradeUninstall(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	ns := harness.Namespace(t, "helm-lifecycle")
	release := "celery-keda-scaler-lifecycle"
	type ref struct {
		gvr  schema.GroupVersionResource
		ns   string
		name string
	}
	deployments := schema.GroupVersionResource{Group: "apps", Version: "v1", Resource: "deployments"}
	services := schema.GroupVersionResource{Version: "v1", Resource: "services"}
	pdbs := schema.GroupVersionResource{Group: "policy", Version: "v1", Resource: "poddisruptionbudgets"}
	accounts := schema.GroupVersionResource{Version: "v1", Resource: "serviceaccounts"}
	ctas := schema.GroupVersionResource{Group: "keda.sh", Version: "v1alpha1", Resource: "clustertriggerauthentications"}
	installed := []ref{{deployments, ns, release}, {services, ns, release}, {pdbs, ns, release}, {accounts, ns, release}}
	cta := ref{ctas, "", release + "-tls"}
	get := func(r ref) (*unstructured.Unstructured, error) {
		if r.ns == "" {
			return harness.Kube.Dynamic.Resource(r.gvr).Get(ctx, r.name, metav1.GetOptions{})
		}
		return harness.Kube.Dynamic.Resource(r.gvr).Namespace(r.ns).Get(ctx, r.name, metav1.GetOptions{})
	}
	releaseSecrets := func() []string {
		list, err := harness.Kube.Client.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{LabelSelector: "owner=helm,name=" + release})
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, s := range list.Items {
			names = append(names, s.Name)
		}
		sort.Strings(names)
		return names
	}

	out, err := helm(t, "install", release, chartRel, "--namespace", ns)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), fmt.Sprintf("scalerAddress: %s.%s.svc.cluster.local:6000", release, ns)) {
		t.Errorf("helm install's notes do not give the scalerAddress:\n%s", out)
	}
	for _, r := range installed {
		if _, err := get(r); err != nil {
			t.Errorf("after helm install: %s %s: %v", r.gvr.Resource, r.name, err)
		}
	}
	if _, err := get(cta); !apierrors.IsNotFound(err) {
		t.Errorf("after helm install without TLS: ClusterTriggerAuthentication %s: %v, want NotFound", cta.name, err)
	}
	if got := releaseSecrets(); !reflect.DeepEqual(got, []string{"sh.helm.release.v1." + release + ".v1"}) {
		t.Errorf("Helm's release records after install: %v", got)
	}

	// Upgrade: TLS and mTLS from Secrets made elsewhere (their content is not read by the API server).
	if _, err := helm(t, "upgrade", release, chartRel, "--namespace", ns, "--set",
		"tls.enabled=true,tls.existingSecret=scaler-tls,tls.triggerAuthentication.clientSecret=keda-client-tls"); err != nil {
		t.Fatal(err)
	}
	dep, err := harness.Kube.Client.AppsV1().Deployments(ns).Get(ctx, release, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	c := dep.Spec.Template.Spec.Containers[0]
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}
	for k, v := range map[string]string{
		"CELERY_KEDA_TLS_CERT_FILE":       "/etc/celery-keda-scaler/tls/tls.crt",
		"CELERY_KEDA_TLS_KEY_FILE":        "/etc/celery-keda-scaler/tls/tls.key",
		"CELERY_KEDA_TLS_CLIENT_CA_FILE":  "/etc/celery-keda-scaler/tls/ca.crt",
		"CELERY_KEDA_TLS_RELOAD_INTERVAL": "10s",
	} {
		if env[k] != v {
			t.Errorf("after helm upgrade with TLS: %s=%q, want %q", k, env[k], v)
		}
	}
	if c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil || c.ReadinessProbe.GRPC != nil || c.ReadinessProbe.HTTPGet.Path != "/readyz" {
		t.Errorf("after helm upgrade with TLS: readiness probe %+v, want only httpGet /readyz", c.ReadinessProbe)
	}
	if v := dep.Spec.Template.Spec.Volumes; len(v) != 1 || v[0].Secret == nil || v[0].Secret.SecretName != "scaler-tls" {
		t.Errorf("after helm upgrade with TLS: volumes %+v, want the Secret scaler-tls", v)
	}
	svc, err := harness.Kube.Client.CoreV1().Services(ns).Get(ctx, release, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if p := svc.Spec.Ports[0]; p.Name != "grpc" || p.AppProtocol != nil {
		t.Errorf("after helm upgrade with TLS: Service port %+v, want grpc without appProtocol h2c", p)
	}
	u, err := get(cta)
	if err != nil {
		t.Fatalf("after helm upgrade with TLS: ClusterTriggerAuthentication %s: %v", cta.name, err)
	}
	refs, _, _ := unstructured.NestedSlice(u.Object, "spec", "secretTargetRef")
	if len(refs) != 3 || refs[0].(map[string]any)["name"] != "keda-client-tls" {
		t.Errorf("ClusterTriggerAuthentication %s: secretTargetRef %v, want caCert/tlsClientCert/tlsClientKey from keda-client-tls", cta.name, refs)
	}
	if got := releaseSecrets(); len(got) != 2 {
		t.Errorf("Helm's release records after upgrade: %v, want v1 and v2", got)
	}

	if _, err := helm(t, "uninstall", release, "--namespace", ns); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, r := range append(installed, cta) {
		for {
			_, err := get(r)
			if apierrors.IsNotFound(err) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("after helm uninstall: %s %s still there (err %v)", r.gvr.Resource, r.name, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	if got := releaseSecrets(); len(got) != 0 {
		t.Errorf("Helm's release records after uninstall: %v", got)
	}
}

// TestHelmKedaSidecarValues: KEDA's own chart (kedacore/charts v2.20.2, pinned in e2e/helm/go.mod)
// rendered with deploy/helm/keda-sidecar-values.yaml gives KEDA's operator Deployment with KEDA's
// container unchanged and the scaler container exactly as deploy/overlays/sidecar adds it; the API
// server accepts it.
func TestHelmKedaSidecarValues(t *testing.T) {
	t.Parallel()
	chart := filepath.Join(harness.ModuleDir(t, "../helm", kedaChartModule), "keda")
	ns := harness.Namespace(t, "helm-keda-sidecar")
	plain := helmTemplate(t, "keda", ns, chart, "--show-only", "templates/manager/deployment.yaml")
	sidecar := helmTemplate(t, "keda", ns, chart, "--show-only", "templates/manager/deployment.yaml", "-f", kedaSidecarRel)
	before, after := byKind(t, plain, "Deployment"), byKind(t, sidecar, "Deployment")
	bc, _, _ := unstructured.NestedSlice(before.Object, "spec", "template", "spec", "containers")
	ac, _, _ := unstructured.NestedSlice(after.Object, "spec", "template", "spec", "containers")
	if len(ac) != len(bc)+1 {
		t.Fatalf("KEDA's operator has %d containers with the sidecar values, %d without; want one more", len(ac), len(bc))
	}
	for i := range bc {
		if !reflect.DeepEqual(bc[i], ac[i]) {
			t.Errorf("the sidecar values changed KEDA's container %v", bc[i].(map[string]any)["name"])
		}
	}
	scalerC := ac[len(ac)-1].(map[string]any)
	patch := harness.ReadExample(t, "deploy/overlays/sidecar/keda-operator-patch.yaml")
	pc, _, _ := unstructured.NestedSlice(patch[0].Object, "spec", "template", "spec", "containers")
	if len(pc) != 1 || !reflect.DeepEqual(pc[0], scalerC) {
		a, _ := json.Marshal(scalerC)
		b, _ := json.Marshal(pc)
		t.Errorf("the scaler container from KEDA's chart values differs from deploy/overlays/sidecar:\nchart values: %s\nkustomize:    %s", a, b)
	}
	n := harness.ApplyAll(t, "KEDA's chart with "+kedaSidecarRel, ns, sidecar)
	applied, err := harness.Kube.Client.AppsV1().Deployments(ns).Get(context.Background(), after.GetName(), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range applied.Spec.Template.Spec.Containers {
		names = append(names, c.Name)
	}
	if want := []string{"keda-operator", "celery-keda-scaler"}; !reflect.DeepEqual(names, want) {
		t.Errorf("applied keda-operator has containers %v, want %v", names, want)
	}
	t.Logf("KEDA chart %s with the sidecar values: %d object(s) applied", chart, n)
}

// --- metrics used by the dashboard and the alerts ------------------------------------------------

// Labels Prometheus adds to every scraped series (target labels of the ServiceMonitor).
var targetLabels = map[string]bool{"namespace": true, "job": true, "instance": true, "pod": true, "service": true, "endpoint": true, "container": true}

// Metrics of other exporters the alerts use on purpose; any other name not of the scaler fails.
var externalMetrics = map[string]string{
	"up": "Prometheus",
	"kube_deployment_status_replicas_available":            "kube-state-metrics",
	"kube_deployment_spec_replicas":                        "kube-state-metrics",
	"certmanager_certificate_expiration_timestamp_seconds": "cert-manager",
}

var (
	promFuncs = map[string]bool{
		"sum": true, "max": true, "min": true, "avg": true, "count": true, "rate": true, "increase": true, "irate": true,
		"histogram_quantile": true, "absent": true, "time": true, "by": true, "on": true, "without": true, "ignoring": true,
		"group_left": true, "group_right": true, "and": true, "or": true, "unless": true, "label_values": true,
		"max_over_time": true, "min_over_time": true,
	}
	reIdent    = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`)
	reSelector = regexp.MustCompile(`([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}`)
	reMatcher  = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"`)
	reGrouping = regexp.MustCompile(`\b(by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)`)
	reLegend   = regexp.MustCompile(`\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}`)
	reDuration = regexp.MustCompile(`\[[^\]]*\]`)
	reString   = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)
)

// query is one PromQL expression of the dashboard or the alerts, with the legend that names its
// series (dashboard only).
type query struct {
	where, expr, legend string
}

// requirement is one thing the real /metrics must have: a metric, optionally with a label,
// optionally with a label value matching op/value.
type requirement struct {
	metric, label, op, value string
	where                    string
}

func (r requirement) String() string {
	s := r.metric
	if r.label != "" {
		s += "{" + r.label
		if r.op != "" {
			s += r.op + fmt.Sprintf("%q", r.value)
		}
		s += "}"
	}
	return s + " (" + r.where + ")"
}

// requirements reads metric names and labels out of PromQL: identifiers that are not functions,
// keywords or label names are metrics; matchers attach to their metric; grouping labels must exist
// on at least one of the expression's scaler metrics, and so must the labels a legend prints.
func requirements(t *testing.T, queries []query) []requirement {
	t.Helper()
	var reqs []requirement
	for _, q := range queries {
		// A dashboard variable's label_values(selector, label): the label must exist on the metric.
		if inner, ok := strings.CutPrefix(q.expr, "label_values("); ok {
			inner = strings.TrimSuffix(inner, ")")
			i := strings.LastIndex(inner, ",")
			label := strings.TrimSpace(inner[i+1:])
			q.expr = inner[:i]
			if !targetLabels[label] {
				m := reIdent.FindString(q.expr)
				reqs = append(reqs, requirement{metric: m, label: label, where: q.where})
			}
		}
		expr := reString.ReplaceAllString(reDuration.ReplaceAllString(q.expr, ""), `""`)
		// Label names inside selectors and groupings are not metrics.
		bare := reSelector.ReplaceAllString(expr, "$1")
		bare = reGrouping.ReplaceAllString(bare, "")
		var metrics []string
		for _, id := range reIdent.FindAllString(bare, -1) {
			if _, fn := promFuncs[id]; fn {
				continue
			}
			if strings.HasPrefix(id, "celery_keda_") {
				metrics = append(metrics, id)
				reqs = append(reqs, requirement{metric: id, where: q.where})
				continue
			}
			if _, ok := externalMetrics[id]; !ok {
				t.Errorf("%s: %q is neither a scaler metric (celery_keda_*) nor a known external one (%v): %s", q.where, id, externalMetrics, q.expr)
			}
		}
		if len(metrics) == 0 && !strings.Contains(q.expr, "up{") && !strings.Contains(q.expr, "kube_") && !strings.Contains(q.expr, "certmanager_") {
			t.Errorf("%s: no metric found in %s", q.where, q.expr)
		}
		for _, m := range reSelector.FindAllStringSubmatch(q.expr, -1) {
			if !strings.HasPrefix(m[1], "celery_keda_") {
				continue
			}
			for _, mm := range reMatcher.FindAllStringSubmatch(m[2], -1) {
				if targetLabels[mm[1]] {
					continue
				}
				r := requirement{metric: m[1], label: mm[1], where: q.where}
				if (mm[2] == "=" || mm[2] == "=~") && !strings.Contains(mm[3], "$") {
					r.op, r.value = mm[2], mm[3]
				}
				reqs = append(reqs, r)
			}
		}
		labels := map[string]bool{}
		for _, g := range reGrouping.FindAllStringSubmatch(q.expr, -1) {
			for _, l := range strings.Split(g[2], ",") {
				if l = strings.TrimSpace(l); l != "" {
					labels[l] = true
				}
			}
		}
		for _, l := range reLegend.FindAllStringSubmatch(q.legend, -1) {
			if !labels[l[1]] {
				t.Errorf("%s: the legend prints {{%s}}, which the query does not keep (%s)", q.where, l[1], q.expr)
			}
			labels[l[1]] = true
		}
		for l := range labels {
			if targetLabels[l] || len(metrics) == 0 {
				continue
			}
			// Any one of the expression's scaler metrics carrying it is enough ("" metric: any of them).
			reqs = append(reqs, requirement{metric: strings.Join(metrics, "|"), label: l, where: q.where})
		}
	}
	return reqs
}

// series is one sample line of the Prometheus text format: name and labels.
type series struct {
	name   string
	labels map[string]string
}

var reSample = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? `)

func scrape(t *testing.T, admin string) []series {
	t.Helper()
	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out []series
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		m := reSample.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		s := series{name: m[1], labels: map[string]string{}}
		for _, l := range reMatcher.FindAllStringSubmatch(m[2], -1) {
			s.labels[l[1]] = l[3]
		}
		out = append(out, s)
	}
	return out
}

// missing returns the requirements no scraped series satisfies.
func missing(reqs []requirement, scraped []series) []requirement {
	var out []requirement
	for _, r := range reqs {
		names := map[string]bool{}
		for _, n := range strings.Split(r.metric, "|") {
			names[n] = true
		}
		ok := false
		for _, s := range scraped {
			if !names[s.name] {
				continue
			}
			if r.label == "" {
				ok = true
				break
			}
			v, has := s.labels[r.label]
			if !has {
				continue
			}
			switch r.op {
			case "":
				ok = true
			case "=":
				ok = v == r.value
			case "=~":
				ok = regexp.MustCompile("^(?:" + r.value + ")$").MatchString(v)
			}
			if ok {
				break
			}
		}
		if !ok {
			out = append(out, r)
		}
	}
	return out
}

// monitoringQueries collects every PromQL expression of the rendered PrometheusRule (every alert
// on: TLS from cert-manager, kube-state-metrics) and of the dashboard (panels and variables).
func monitoringQueries(t *testing.T) []query {
	t.Helper()
	objs := helmTemplate(t, chartName, "keda", chartRel,
		"-f", filepath.Join(chartCIRel, "tls-cert-manager-values.yaml"), "-f", filepath.Join(chartCIRel, "monitoring-values.yaml"))
	var queries []query
	groups, _, _ := unstructured.NestedSlice(byKind(t, objs, "PrometheusRule").Object, "spec", "groups")
	for _, g := range groups {
		for _, r := range g.(map[string]any)["rules"].([]any) {
			rule := r.(map[string]any)
			queries = append(queries, query{where: "alert " + rule["alert"].(string), expr: rule["expr"].(string)})
		}
	}
	cm := byKind(t, objs, "ConfigMap")
	raw, _, _ := unstructured.NestedString(cm.Object, "data", "celery-keda-scaler.json")
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr         string `json:"expr"`
				LegendFormat string `json:"legendFormat"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name       string `json:"name"`
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal([]byte(raw), &dash); err != nil {
		t.Fatalf("the dashboard ConfigMap's JSON: %v", err)
	}
	panels := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			queries = append(queries, query{where: "panel " + p.Title, expr: tg.Expr, legend: tg.LegendFormat})
			panels++
		}
	}
	for _, v := range dash.Templating.List {
		if v.Definition != "" {
			queries = append(queries, query{where: "variable $" + v.Name, expr: v.Definition})
		}
	}
	if len(groups) == 0 || panels == 0 {
		t.Fatalf("no alerts (%d groups) or no dashboard queries (%d)", len(groups), panels)
	}
	return queries
}

// runUnattributedTask makes the census of broker (a Redis database) find a running task it can
// attribute to no queue, as README's runbook of CeleryKedaCensusUnresolvedTasks describes: a real
// Celery worker consumes queue, bound to a direct exchange of its own, and runs (early ack) a task
// published through that exchange; then the exchange's binding table is deleted. The worker is
// stopped when the test ends (its warm shutdown waits at most the harness' 15 s for the task).
func runUnattributedTask(t *testing.T, pub *harness.Publisher, broker, queue string) {
	t.Helper()
	exchange := queue + "-exchange"
	routes := fmt.Sprintf(`CKS_TASK_QUEUES=[{"name": %q, "exchange": %q, "type": "direct", "routing_key": "k"}]`, queue, exchange)
	harness.StartWorkerEnv(t, broker, []string{queue}, 1, "CKS_MARKER_REDIS="+broker, routes)
	marker := "helm-metrics-unattributed"
	// publish.py declares the queue and its binding first, so the task is routed before the worker is up.
	publish := exec.Command(harness.Python, filepath.Join(harness.RepoRoot, "tests", "celery_app", "publish.py"),
		"--queue", queue, "--exchange", exchange, "--routing-key", "k", "--seconds", "600", "--marker", marker)
	publish.Env = append(os.Environ(), "CKS_BROKER="+broker, routes)
	if out, err := publish.CombinedOutput(); err != nil || strings.TrimSpace(string(out)) != "1" {
		t.Fatalf("publish.py through %s: %v\n%s", exchange, err, out)
	}
	pub.WaitStarted(t, marker, 1)
	out, err := exec.Command("redis-cli", "-u", broker, "DEL", "_kombu.binding."+exchange).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "1" {
		t.Fatalf("redis-cli DEL _kombu.binding.%s (want 1 key deleted): %v: %s", exchange, err, out)
	}
}

// TestHelmMonitoringMetricsExist: every metric and label (and label value) that the chart's
// alerts and dashboard query exists in the real /metrics of running scalers after real readings:
// a scaler of the test's own read by KEDA (one ScaledObject on a Redis database of the test's with
// tasks waiting, one on a Redis port nobody listens on: broker and census errors; no other test's
// readings in its /metrics) that also watches two queues of that database (--watch, its default
// broker), one of them running a task a real Celery worker took through an exchange whose binding
// is then deleted (a running task the census attributes to no queue), and a scaler with TLS whose
// certificate files are replaced by a broken and then a valid set and that gets a plaintext
// connection on its TLS port. Renaming a metric or a label breaks this test, not the dashboard.
func TestHelmMonitoringMetricsExist(t *testing.T) {
	t.Parallel()
	queries := monitoringQueries(t)
	reqs := requirements(t, queries)
	t.Logf("%d queries (alerts and dashboard) need %d metric/label facts", len(queries), len(reqs))
	// The extraction itself: every scaler metric family of README's table is used, and these facts
	// (one per kind of requirement) are among the ones checked.
	names := map[string]bool{}
	facts := map[string]bool{}
	for _, r := range reqs {
		for _, n := range strings.Split(r.metric, "|") {
			names[strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(n, "_bucket"), "_count"), "_total")] = true
		}
		facts[strings.SplitN(r.String(), " (", 2)[0]] = true
	}
	for _, family := range []string{"celery_keda_queue_depth", "celery_keda_rpc", "celery_keda_rpc_duration_seconds",
		"celery_keda_broker_read_duration_seconds", "celery_keda_broker_errors", "celery_keda_census_age_seconds",
		"celery_keda_census_failures", "celery_keda_streams", "celery_keda_shared_polls", "celery_keda_queue_series_dropped",
		"celery_keda_tls_reloads", "celery_keda_tls_handshake_failures", "celery_keda_refusals",
		"celery_keda_watched_queue_tasks", "celery_keda_watched_queue_up", "celery_keda_census_unresolved_tasks"} {
		if !names[family] {
			t.Errorf("no alert or dashboard query uses %s (extracted: %v)", family, names)
		}
	}
	for _, f := range []string{`celery_keda_queue_depth{state="in_flight"}`, `celery_keda_tls_reloads_total{result="error"}`,
		`celery_keda_rpc_total{code}`, `celery_keda_census_failures_total{broker}`,
		`celery_keda_watched_queue_tasks{state="ready"}`, `celery_keda_watched_queue_up{queue}`,
		`celery_keda_census_unresolved_tasks_total{broker}`} {
		if !facts[f] {
			t.Errorf("the extracted requirements lack %s", f)
		}
	}
	if left := missing(reqs, nil); len(left) != len(reqs) {
		t.Fatalf("with nothing scraped, %d of %d requirements count as met", len(reqs)-len(left), len(reqs))
	}

	// Readings by KEDA on a plain scaler of the test's own, which also watches the queue KEDA
	// reads and a queue with a running task the census cannot attribute (its default broker is
	// the test's database).
	queue, lost := "helm-metrics", "helm-metrics-lost"
	broker := harness.LeaseRedisDB(t).URL
	plain := harness.OwnScaler(t, "helm-metrics", []string{"--watch", queue + "," + lost, "--watch-interval", "1s"},
		"CELERY_BROKER_URL="+broker)
	pub := harness.NewPublisher(t, broker)
	pub.Purge(t, queue)
	t.Cleanup(func() { pub.Purge(t, queue) })
	pub.Publish(t, queue, 3, 0)
	runUnattributedTask(t, pub, broker, lost)
	okNS := harness.Namespace(t, "helm-metrics-ok")
	secret, deployment, so := harness.RedisWorkerExample(t, broker)
	harness.SetTrigger(t, so, "queues", queue)
	harness.SetTrigger(t, so, "scalerAddress", plain.Addr)
	harness.Apply(t, okNS, secret, deployment, so)
	port, err := process.FreePort() // nothing listens here: connection refused
	if err != nil {
		t.Fatal(err)
	}
	badNS := harness.Namespace(t, "helm-metrics-down")
	secret2, deployment2, so2 := harness.RedisWorkerExample(t, broker)
	harness.Set(t, secret2, fmt.Sprintf("redis://127.0.0.1:%d/0", port), "stringData", "url")
	harness.SetTrigger(t, so2, "queues", queue)
	harness.SetTrigger(t, so2, "scalerAddress", plain.Addr)
	harness.Set(t, so2, int64(2), "spec", "pollingInterval")
	harness.Apply(t, badNS, secret2, deployment2, so2)
	t.Cleanup(func() {
		for ns, name := range map[string]string{okNS: so.GetName(), badNS: so2.GetName()} {
			_ = harness.Kube.Dynamic.Resource(harness.ScaledObjectGVR).Namespace(ns).Delete(context.Background(), name, metav1.DeleteOptions{})
		}
	})

	// A scaler with TLS: a refused and an accepted certificate reload, a failed handshake.
	dir := t.TempDir()
	leaf, err := harness.Kube.CA.Issue("celery-keda-scaler", nil, "127.0.0.1", "localhost")
	if err != nil {
		t.Fatal(err)
	}
	if err := leaf.Write(dir, "tls.crt", "tls.key"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ca.crt"), harness.Kube.CA.CertPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	tlsScaler, err := harness.StartScaler("helm-metrics-tls", []string{
		"--tls-cert-file", filepath.Join(dir, "tls.crt"), "--tls-key-file", filepath.Join(dir, "tls.key"),
		"--tls-client-ca-file", filepath.Join(dir, "ca.crt"), "--tls-reload-interval", "100ms",
	})
	if err != nil {
		t.Fatal(err)
	}
	defer tlsScaler.Stop()
	counter := func(name string, labels map[string]string) float64 {
		resp, err := http.Get("http://" + tlsScaler.Admin + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			line := sc.Text()
			m := reSample.FindStringSubmatch(line)
			if m == nil || m[1] != name {
				continue
			}
			match := true
			for k, v := range labels {
				if !strings.Contains(m[2], fmt.Sprintf("%s=%q", k, v)) {
					match = false
				}
			}
			if match {
				var f float64
				fmt.Sscanf(strings.TrimSpace(line[len(m[0]):]), "%g", &f)
				return f
			}
		}
		return 0
	}
	waitCounter := func(name string, labels map[string]string, min float64) {
		deadline := time.Now().Add(20 * time.Second)
		for counter(name, labels) < min {
			if time.Now().After(deadline) {
				t.Fatalf("%s%v stayed below %v on the TLS scaler\n%s", name, labels, min, process.Tail(tlsScaler.Log, 20))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// A half-written renewal: a certificate that does not parse.
	if err := os.WriteFile(filepath.Join(dir, "tls.crt"), []byte("-----BEGIN CERTIFICATE-----\nbroken\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	waitCounter("celery_keda_tls_reloads_total", map[string]string{"result": "error"}, 1)
	leaf2, err := harness.Kube.CA.Issue("celery-keda-scaler", nil, "127.0.0.1", "localhost")
	if err != nil {
		t.Fatal(err)
	}
	if err := leaf2.Write(dir, "tls.crt", "tls.key"); err != nil {
		t.Fatal(err)
	}
	waitCounter("celery_keda_tls_reloads_total", map[string]string{"result": "ok"}, 1)
	conn, err := net.Dial("tcp", tlsScaler.Addr)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = conn.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")) // plaintext HTTP/2 on a TLS port
	waitCounter("celery_keda_tls_handshake_failures_total", nil, 1)
	conn.Close()

	// KEDA's readings: wait until the union of both scrapes satisfies every requirement.
	deadline := time.Now().Add(90 * time.Second)
	for {
		scraped := append(scrape(t, plain.Admin), scrape(t, tlsScaler.Admin)...)
		left := missing(reqs, scraped)
		if len(left) == 0 {
			t.Logf("every metric, label and label value of the alerts and the dashboard is in the scalers' /metrics (%d series scraped)", len(scraped))
			return
		}
		if time.Now().After(deadline) {
			var lines []string
			for _, r := range left {
				lines = append(lines, "  "+r.String())
			}
			t.Fatalf("not in the real /metrics after 90s of readings (the dashboard or an alert queries something the scaler does not export):\n%s\n%s",
				strings.Join(lines, "\n"), harness.Describe(badNS, harness.ScaledObjectGVR, so2.GetName()))
		}
		time.Sleep(500 * time.Millisecond)
	}
}
