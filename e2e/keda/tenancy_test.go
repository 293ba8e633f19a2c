package e2e

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestTenancyBrokerReservedToNamespace: deploy/examples/multi-team with a scaler configured from its
// brokers Secret and allowlist (URLs pointed at this machine's brokers). team-a's ScaledObject
// scales its worker; the same ScaledObject in team-b, naming the broker reserved to team-a, is not
// Ready, shows the scaler's refusal, and its Deployment never leaves 0.
func TestTenancyBrokerReservedToNamespace(t *testing.T) {
	brokers := find(t, readExample(t, "deploy/examples/multi-team/brokers.yaml"), "Secret")
	data, _, _ := unstructuredStringMap(brokers.Object, "stringData")
	local := map[string]string{
		"CELERY_KEDA_BROKER_TEAM_A": e2eBroker(),
		"CELERY_KEDA_BROKER_TEAM_B": os.Getenv("CKS_AMQP_URL"),
	}
	var env []string
	for k, v := range data {
		if u, ok := local[k]; ok {
			v = u
		}
		env = append(env, k+"="+v)
	}
	kust, err := os.ReadFile(repoRoot + "/deploy/examples/multi-team/kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	allow := regexp.MustCompile(`name: CELERY_KEDA_ALLOWED_BROKER_HOSTS\s+value: "([^"]+)"`).FindSubmatch(kust)
	if allow == nil {
		t.Fatal("deploy/examples/multi-team/kustomization.yaml sets no CELERY_KEDA_ALLOWED_BROKER_HOSTS")
	}
	env = append(env, "CELERY_KEDA_ALLOWED_BROKER_HOSTS="+string(allow[1]))
	s, err := startScaler(os.Getenv("CKS_SCALER_BIN"), "scaler-multi-team", nil, env...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.stop)
	if !strings.Contains(readFile(t, s.log), "Tenancy protections") {
		t.Fatalf("the scaler logged no tenancy protections line\n%s", process.Tail(s.log, 10))
	}

	pub := newPublisher(t, local["CELERY_KEDA_BROKER_TEAM_A"])
	pub.purge(t, "celery")
	teamA := readExample(t, "deploy/examples/multi-team/team-a.yaml")
	soA := find(t, teamA, "ScaledObject")
	setTrigger(t, soA, "scalerAddress", s.Addr)
	apply(t, "", find(t, teamA, "Namespace"))
	nsA := soA.GetNamespace()
	// team-b: the same ScaledObject, naming team-a's broker from the wrong namespace.
	nsB := namespace(t, "team-b")
	soB := soA.DeepCopy()
	soB.SetNamespace(nsB)
	watches := map[string]*replicaWatch{}
	for _, ns := range []string{nsA, nsB} {
		secret, deployment, _ := exampleWorker(t)
		deployment.SetName(soA.GetName())
		apply(t, ns, secret, deployment)
		watches[ns] = watchReplicas(t, ns, deployment.GetName())
	}
	apply(t, nsA, soA)
	apply(t, nsB, soB)
	waitScaledObjectReady(t, nsA, soA.GetName(), 60*time.Second)
	// KEDA v2.20 does not put a failed GetMetricSpec's message on the ScaledObject (its scaler
	// interface returns no error there): the condition says "no metric specs returned from
	// scalers", and the scaler's refusal is in the operator's log (README, Troubleshooting).
	msg := waitNotReady(t, nsB, soB.GetName(), "no metric specs returned from scalers")
	refusal := "code = PermissionDenied desc = metadata key `broker`: broker `team-a` is not available to namespace `team-b`"
	line := waitLogLine(t, kube.OperatorLog, `"namespace": "team-b"`, refusal, 30*time.Second)
	t.Logf("team-b's ScaledObject: Ready=False: %s; the operator logged: %s", msg, line)

	pub.publish(t, "celery", 1, 0)
	if _, ok := watches[nsA].waitFor(1, 30*time.Second); !ok {
		t.Fatalf("team-a: one task published, replicas %d, want 1\n%s", watches[nsA].current().Replicas, describe(nsA, scaledObjectGVR, soA.GetName()))
	}
	// team-b saw the same task through nobody: still Ready=False, never scaled.
	u, err := kube.Dynamic.Resource(scaledObjectGVR).Namespace(nsB).Get(context.Background(), soB.GetName(), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if c := cluster.FindCondition(u, "Ready"); c == nil || c["status"] != "False" {
		t.Fatalf("team-b's ScaledObject became %v", c)
	}
	if h := watches[nsB].changes(); len(h) != 1 || h[0].Replicas != 0 {
		t.Fatalf("team-b's Deployment changed: %v", h)
	}
	if refusals, err := s.counter(`celery_keda_refusals_total{reason="namespace"}`); err != nil || refusals < 1 {
		t.Fatalf("celery_keda_refusals_total{reason=\"namespace\"} = %v (err %v), want >= 1", refusals, err)
	}
	pub.purge(t, "celery")
}

func readFile(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func unstructuredStringMap(obj map[string]any, field string) (map[string]string, bool, error) {
	raw, ok := obj[field].(map[string]any)
	if !ok {
		return nil, false, fmt.Errorf("no %s", field)
	}
	out := map[string]string{}
	for k, v := range raw {
		out[k] = fmt.Sprint(v)
	}
	return out, true, nil
}

// waitLogLine waits for a line of a log file that contains both strings, and returns it.
func waitLogLine(t testing.TB, path, a, b string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		for _, line := range strings.Split(readFile(t, path), "\n") {
			if strings.Contains(line, a) && strings.Contains(line, b) {
				return line
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no line with %q and %q in %s within %s\n%s", a, b, path, timeout, process.Tail(path, 10))
		}
		time.Sleep(200 * time.Millisecond)
	}
}
