package e2e

import (
	"context"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
	"github.com/celery-keda-scaler/e2e/keda/harness"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestTenancyBrokerReservedToNamespace: deploy/examples/multi-team with a scaler configured from its
// brokers Secret and allowlist (URLs pointed at this machine's brokers). team-a's ScaledObject
// scales its worker; the same ScaledObject in team-b, naming the broker reserved to team-a, is not
// Ready, shows the scaler's refusal, and its Deployment never leaves 0.
func TestTenancyBrokerReservedToNamespace(t *testing.T) {
	t.Parallel()
	broker := harness.LeaseRedisDB(t).URL
	brokers := harness.Find(t, harness.ReadExample(t, "deploy/examples/multi-team/brokers.yaml"), "Secret")
	data, _, _ := harness.StringMap(brokers.Object, "stringData")
	local := map[string]string{
		"CELERY_KEDA_BROKER_TEAM_A": broker,
		"CELERY_KEDA_BROKER_TEAM_B": os.Getenv("CKS_AMQP_URL"),
	}
	var env []string
	for k, v := range data {
		if u, ok := local[k]; ok {
			v = u
		}
		env = append(env, k+"="+v)
	}
	kust, err := os.ReadFile(harness.RepoRoot + "/deploy/examples/multi-team/kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	allow := regexp.MustCompile(`name: CELERY_KEDA_ALLOWED_BROKER_HOSTS\s+value: "([^"]+)"`).FindSubmatch(kust)
	if allow == nil {
		t.Fatal("deploy/examples/multi-team/kustomization.yaml sets no CELERY_KEDA_ALLOWED_BROKER_HOSTS")
	}
	env = append(env, "CELERY_KEDA_ALLOWED_BROKER_HOSTS="+string(allow[1]))
	s, err := harness.StartScaler("scaler-multi-team", nil, env...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	if !strings.Contains(harness.ReadFile(t, s.Log), "Tenancy protections") {
		t.Fatalf("the scaler logged no tenancy protections line\n%s", process.Tail(s.Log, 10))
	}

	pub := harness.NewPublisher(t, local["CELERY_KEDA_BROKER_TEAM_A"])
	pub.Purge(t, "celery")
	teamA := harness.ReadExample(t, "deploy/examples/multi-team/team-a.yaml")
	soA := harness.Find(t, teamA, "ScaledObject")
	harness.SetTrigger(t, soA, "scalerAddress", s.Addr)
	harness.Apply(t, "", harness.Find(t, teamA, "Namespace"))
	nsA := soA.GetNamespace()
	// team-b: the same ScaledObject, naming team-a's broker from the wrong namespace.
	nsB := harness.Namespace(t, "team-b")
	soB := soA.DeepCopy()
	soB.SetNamespace(nsB)
	watches := map[string]*harness.ReplicaWatch{}
	for _, ns := range []string{nsA, nsB} {
		secret, deployment, _ := harness.RedisWorkerExample(t, broker)
		deployment.SetName(soA.GetName())
		harness.Apply(t, ns, secret, deployment)
		watches[ns] = harness.WatchReplicas(t, ns, deployment.GetName())
	}
	harness.Apply(t, nsA, soA)
	harness.Apply(t, nsB, soB)
	harness.WaitScaledObjectReady(t, nsA, soA.GetName(), 60*time.Second)
	// KEDA v2.20 does not put a failed GetMetricSpec's message on the ScaledObject (its scaler
	// interface returns no error there): the condition says "no metric specs returned from
	// scalers", and the scaler's refusal is in the operator's log (README, Troubleshooting).
	msg := harness.WaitNotReady(t, nsB, soB.GetName(), "no metric specs returned from scalers")
	refusal := "code = PermissionDenied desc = metadata key `broker`: broker `team-a` is not available to namespace `team-b`"
	line := harness.WaitLogLine(t, harness.Kube.OperatorLog, `"namespace": "team-b"`, refusal, 30*time.Second)
	t.Logf("team-b's ScaledObject: Ready=False: %s; the operator logged: %s", msg, line)

	pub.Publish(t, "celery", 1, 0)
	if _, ok := watches[nsA].WaitFor(1, 30*time.Second); !ok {
		t.Fatalf("team-a: one task published, replicas %d, want 1\n%s", watches[nsA].Current().Replicas, harness.Describe(nsA, harness.ScaledObjectGVR, soA.GetName()))
	}
	// team-b saw the same task through nobody: still Ready=False, never scaled.
	u, err := harness.Kube.Dynamic.Resource(harness.ScaledObjectGVR).Namespace(nsB).Get(context.Background(), soB.GetName(), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if c := cluster.FindCondition(u, "Ready"); c == nil || c["status"] != "False" {
		t.Fatalf("team-b's ScaledObject became %v", c)
	}
	if h := watches[nsB].Changes(); len(h) != 1 || h[0].Replicas != 0 {
		t.Fatalf("team-b's Deployment changed: %v", h)
	}
	if refusals, err := s.Counter(`celery_keda_refusals_total{reason="namespace"}`); err != nil || refusals < 1 {
		t.Fatalf("celery_keda_refusals_total{reason=\"namespace\"} = %v (err %v), want >= 1", refusals, err)
	}
	pub.Purge(t, "celery")
}
