package e2e

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// sqsSuite is the moto server scripts/test.sh starts (CKS_SQS_ENDPOINT), the Celery broker URL
// that reaches it with moto's test keys, and a queue-name prefix of the test's own, so that no two
// tests share an SQS queue.
type sqsSuite struct {
	endpoint, broker, prefix string
}

// newSQSSuite is the suite's moto (endpoint "") or a moto server of the test's own.
func newSQSSuite(t testing.TB, endpoint string) sqsSuite {
	t.Helper()
	if endpoint == "" {
		endpoint = os.Getenv("CKS_SQS_ENDPOINT")
	}
	if endpoint == "" {
		t.Fatal("CKS_SQS_ENDPOINT must be set (scripts/test.sh starts moto and sets it)")
	}
	endpoint = strings.TrimRight(endpoint, "/")
	return sqsSuite{
		endpoint: endpoint,
		broker:   "sqs://testing:testing@" + strings.TrimPrefix(endpoint, "http://"),
		prefix:   fmt.Sprintf("e2e-%d-", time.Now().UnixNano()),
	}
}

// env is what cks_app needs to use the suite's prefix (publisher and workers).
func (s sqsSuite) env() string { return "CKS_QUEUE_NAME_PREFIX=" + s.prefix }

// queueURL is the SQS queue URL of a Celery queue, as moto names it (kombu replaces `.` by `-`).
func (s sqsSuite) queueURL(celeryQueue string) string {
	return s.endpoint + "/123456789012/" + s.prefix + strings.ReplaceAll(celeryQueue, ".", "-")
}

// probeArgs are the trigger keys besides brokerUrl and queues for `probe`.
func (s sqsSuite) probeArgs() []string {
	return []string{"queueNamePrefix=" + s.prefix, "awsRegion=us-east-1"}
}

// builtinSQS is a copy of the example's Deployment scaled by KEDA's own `aws-sqs-queue` scaler on
// the same SQS queue, as a user would set it: the queue URL, the region, the endpoint (moto), and
// the keys through a TriggerAuthentication. Its defaults are kept (scaleOnInFlight true).
func builtinSQS(t testing.TB, s sqsSuite, deployment *unstructured.Unstructured, celeryQueue string, value int, cooldown, polling int64) (objs []*unstructured.Unstructured, dep, so *unstructured.Unstructured) {
	t.Helper()
	keys := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1", "kind": "Secret",
		"metadata":   map[string]any{"name": "builtin-sqs-keys"},
		"stringData": map[string]any{"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
	}}
	auth := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "keda.sh/v1alpha1", "kind": "TriggerAuthentication",
		"metadata": map[string]any{"name": "builtin-sqs-keys"},
		"spec": map[string]any{"secretTargetRef": []any{
			map[string]any{"parameter": "awsAccessKeyID", "name": "builtin-sqs-keys", "key": "AWS_ACCESS_KEY_ID"},
			map[string]any{"parameter": "awsSecretAccessKey", "name": "builtin-sqs-keys", "key": "AWS_SECRET_ACCESS_KEY"},
		}},
	}}
	dep = copyDeployment(t, deployment, "builtin-sqs-worker")
	so = newScaledObject(dep.GetName(), dep.GetName(), "aws-sqs-queue", polling, cooldown, map[string]any{
		"queueURL": s.queueURL(celeryQueue), "queueLength": fmt.Sprint(value),
		"awsRegion": "us-east-1", "awsEndpoint": s.endpoint,
	})
	trigger := so.Object["spec"].(map[string]any)["triggers"].([]any)[0].(map[string]any)
	trigger["authenticationRef"] = map[string]any{"name": auth.GetName()}
	return []*unstructured.Unstructured{keys, auth}, dep, so
}

// TestSQSHPAScalesWithInFlightTasks: 47 long acks_late tasks, a worker with concurrency 2 and
// prefetch multiplier 4 receives some (invisible on SQS until deleted): ours counts visible +
// invisible = 47 -> exactly ceil(47/5) = 10 replicas. KEDA's `aws-sqs-queue` scaler, beside it on
// the same queue, counts invisible messages by default too (scaleOnInFlight): recorded.
func TestSQSHPAScalesWithInFlightTasks(t *testing.T) {
	ns := namespace(t, nsName(t, ""))
	b := newExampleBroker(t, "sqs", ns)
	s := b.sqs
	pub := b.publisher(t)
	secret, deployment, so := b.workerExample(t)
	setTrigger(t, so, "queueLength", "5")
	set(t, so, int64(5), "spec", "pollingInterval")
	extra, bDep, bSO := builtinSQS(t, s, deployment, "celery", 5, 300, 5)
	pub.publish(t, "celery", 47, 120) // creates the queue; nothing finishes during the test
	startWorkerEnv(t, s.broker, []string{"celery"}, 2, s.env(), "CKS_ACKS_LATE=1", "CKS_PREFETCH=4",
		"CKS_MARKER_REDIS="+e2eBroker())
	apply(t, ns, append(extra, secret, deployment, so, bDep, bSO)...)
	waitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
	waitScaledObjectReady(t, ns, bSO.GetName(), 60*time.Second)
	ours, builtin := watchReplicas(t, ns, deployment.GetName()), watchReplicas(t, ns, bDep.GetName())
	if _, ok := ours.waitFor(10, 120*time.Second); !ok {
		t.Fatalf("47 tasks (some received by the worker): replicas %d, want 10; %v\n%s", ours.current().Replicas, ours.changes(), describe(ns, scaledObjectGVR, so.GetName()))
	}
	if _, ok := builtin.waitFor(10, 120*time.Second); !ok {
		t.Fatalf("KEDA's aws-sqs-queue scaler (scaleOnInFlight true by default): replicas %d, want 10; %v\n%s", builtin.current().Replicas, builtin.changes(), describe(ns, scaledObjectGVR, bSO.GetName()))
	}
	// The worker holds some of them invisible: what both counted includes in-flight messages.
	inFlight, err := probeDepth(s.broker, "celery", append(s.probeArgs(), "scaleOnInFlight=false")...)
	if err != nil || inFlight >= 47 {
		t.Fatalf("visible messages %d (err %v): the worker was expected to hold some in flight", inFlight, err)
	}
	t.Logf("47 tasks, %d visible: ours %v; KEDA's aws-sqs-queue scaler %v", inFlight, ours.changes(), builtin.changes())
	writeResult(t, "sqs_hpa_in_flight", map[string]any{"ours_replicas": 10, "builtin_sqs_replicas": builtin.current().Replicas, "visible": inFlight})
}

// TestSQSNeverToZeroUnderAcksLateTasks: the README's SQS recipe (`acks_late`): two 45 s tasks run,
// nothing else is queued. Their messages stay invisible until the tasks finish, so ours keeps 1
// replica through 4.5 cooldownPeriods and reaches 0 only after they end. KEDA's `aws-sqs-queue`
// scaler with its defaults (scaleOnInFlight true) reads the same messages: recorded beside it.
func TestSQSNeverToZeroUnderAcksLateTasks(t *testing.T) {
	const cooldown, polling, taskSeconds = 10, 5, 45
	ns := namespace(t, nsName(t, ""))
	b := newExampleBroker(t, "sqs", ns)
	s := b.sqs
	pub := b.publisher(t)
	secret, deployment, so := b.workerExample(t)
	set(t, so, int64(cooldown), "spec", "cooldownPeriod")
	set(t, so, int64(polling), "spec", "pollingInterval")
	extra, bDep, bSO := builtinSQS(t, s, deployment, "celery", 10, cooldown, polling)
	marker := fmt.Sprintf("cks-e2e-started-%d", time.Now().UnixNano())
	pub.do(t, map[string]any{"op": "publish", "queue": "celery", "count": 2, "seconds": taskSeconds, "marker": marker})
	apply(t, ns, append(extra, secret, deployment, so, bDep, bSO)...)
	waitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
	waitScaledObjectReady(t, ns, bSO.GetName(), 60*time.Second)
	ours, builtin := watchReplicas(t, ns, deployment.GetName()), watchReplicas(t, ns, bDep.GetName())
	for name, rw := range map[string]*replicaWatch{"ours": ours, "KEDA's aws-sqs-queue scaler": builtin} {
		if _, ok := rw.waitFor(1, 30*time.Second); !ok {
			t.Fatalf("%s: two tasks queued, replicas %d, want 1", name, rw.current().Replicas)
		}
	}
	markers := newPublisher(t, e2eBroker())
	startWorkerEnv(t, s.broker, []string{"celery"}, 2, s.env(), "CKS_ACKS_LATE=1",
		"CKS_MARKER_REDIS="+e2eBroker())
	waitStarted(t, markers, marker, 2)
	started := time.Now()
	if visible, err := probeDepth(s.broker, "celery", append(s.probeArgs(), "scaleOnInFlight=false")...); err != nil || visible != 0 {
		t.Fatalf("both tasks run: visible messages %d (err %v), want 0", visible, err)
	}
	ended := waitDepthZeroQueues(t, s.broker, "celery", s.probeArgs()...)
	if ended.Before(started.Add((taskSeconds - 2) * time.Second)) {
		t.Fatalf("the scaler read 0 at %s, before the tasks could finish", ended.Format("15:04:05"))
	}
	exposure := func(rw *replicaWatch) float64 {
		for _, c := range rw.changes() {
			if c.Replicas == 0 && c.At.After(started) && c.At.Before(ended) {
				return ended.Sub(c.At).Seconds()
			}
		}
		return 0
	}
	if e := exposure(ours); e != 0 {
		t.Fatalf("ours went to 0 %.1f s before the tasks ended: %v", e, ours.changes())
	}
	if _, ok := ours.waitFor(0, time.Duration(cooldown+3*polling+30)*time.Second); !ok {
		t.Fatalf("tasks done, replicas still %d", ours.current().Replicas)
	}
	builtinExposed := exposure(builtin)
	t.Logf("tasks ran %s -> %s; ours %v; KEDA's aws-sqs-queue scaler %v, scaled in under running tasks for %.1f s",
		started.Format("15:04:05"), ended.Format("15:04:05"), ours.changes(), builtin.changes(), builtinExposed)
	writeResult(t, "sqs_acks_late_running_tasks", map[string]any{"ours_exposed_s": 0, "builtin_sqs_exposed_s": builtinExposed})
}
