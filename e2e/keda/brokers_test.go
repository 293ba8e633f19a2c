package e2e

import (
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// exampleBroker is one broker's examples (deploy/examples/<name>) made to run on this machine, in
// a place of the test's own: Redis shares the suite's database (queues purged), RabbitMQ gets a
// vhost per test, SQS a queue-name prefix per test.
type exampleBroker struct {
	name   string
	broker string   // the Celery broker URL
	env    []string // cks_app environment for publishers and workers
	probe  []string // trigger keys `probe` needs besides brokerUrl and queues
	queues string   // the worker example's queues, as its trigger names them
	// pushBound is how long after publishing a push-activated trigger must reach 1 replica: the
	// scaler's stream poll (200 ms on Redis and RabbitMQ, 5 s on SQS, where every read is billed)
	// plus well under a second for the push and KEDA's /scale.
	pushBound time.Duration
	dir       string
	fix       func(t testing.TB, o *unstructured.Unstructured) // scalerAddress and broker keys
	sqs       sqsSuite                                         // SQS only: endpoint and queue prefix
}

// brokerNames are the brokers every broker-independent promise is proven on.
var brokerNames = []string{"redis", "rabbitmq", "sqs"}

func newExampleBroker(t testing.TB, name, ns string) exampleBroker {
	t.Helper()
	return newExampleBrokerAt(t, name, ns, "")
}

// newExampleBrokerAt is newExampleBroker on a server of the test's own: endpoint is the Redis URL
// or the SQS endpoint (RabbitMQ always uses the suite's server, in a vhost of the test).
func newExampleBrokerAt(t testing.TB, name, ns, endpoint string) exampleBroker {
	t.Helper()
	b := exampleBroker{name: name, dir: "deploy/examples/" + name, pushBound: time.Second}
	switch name {
	case "redis":
		b.broker, b.queues = e2eBroker(), "celery,priority"
		if endpoint != "" {
			b.broker = endpoint
		}
		b.fix = func(t testing.TB, o *unstructured.Unstructured) {
			setTrigger(t, o, "scalerAddress", scaler.Addr)
		}
		// The suite's database is shared: start from empty queues.
		newPublisher(t, b.broker).purge(t, "celery", "priority", "reports")
	case "rabbitmq":
		amqp, mgmt := rabbitVhost(t, ns)
		b.broker, b.queues, b.probe = amqp, "celery", []string{"managementUrl=" + mgmt}
		b.fix = func(t testing.TB, o *unstructured.Unstructured) {
			setTrigger(t, o, "scalerAddress", scaler.Addr)
			setTrigger(t, o, "managementUrl", mgmt)
			if o.GetKind() == "ScaledObject" {
				// The example's `priority` queue is declared by its workers: a queue that does
				// not exist yet is an error on RabbitMQ, and no worker runs before the test's.
				setTrigger(t, o, "queues", "celery")
			}
		}
	case "sqs":
		s := newSQSSuite(t, endpoint)
		b.sqs = s
		b.broker, b.queues, b.env, b.probe = s.broker, "celery", []string{s.env()}, s.probeArgs()
		b.pushBound = 6 * time.Second
		b.fix = func(t testing.TB, o *unstructured.Unstructured) {
			setTrigger(t, o, "scalerAddress", scaler.Addr)
			setTrigger(t, o, "queueNamePrefix", s.prefix)
			setTrigger(t, o, "awsRegion", "us-east-1")
			if o.GetKind() == "ScaledObject" {
				setTrigger(t, o, "queues", "celery") // the example's are orders,orders.high
			}
		}
	default:
		t.Fatalf("no broker %q", name)
	}
	return b
}

// forEachBroker runs scenario once per broker, each in a namespace of its own.
func forEachBroker(t *testing.T, scenario func(t *testing.T, b exampleBroker, ns string)) {
	for _, name := range brokerNames {
		t.Run(name, func(t *testing.T) {
			ns := namespace(t, nsName(t, ""))
			scenario(t, newExampleBroker(t, name, ns), ns)
		})
	}
}

func (b exampleBroker) publisher(t testing.TB) *publisher {
	t.Helper()
	return newPublisherEnv(t, b.broker, b.env...)
}

func (b exampleBroker) worker(t testing.TB, concurrency int) {
	t.Helper()
	startWorkerEnv(t, b.broker, []string{"celery", "priority"}, concurrency, append([]string{"CKS_MARKER_REDIS=" + e2eBroker()}, b.env...)...)
}

// workerExample loads <dir>/worker.yaml: its Secret (with this machine's broker URL), Deployment
// and ScaledObject.
func (b exampleBroker) workerExample(t testing.TB) (secret, deployment, so *unstructured.Unstructured) {
	t.Helper()
	objs := readExample(t, b.dir+"/worker.yaml")
	secret, deployment, so = find(t, objs, "Secret"), find(t, objs, "Deployment"), find(t, objs, "ScaledObject")
	set(t, secret, b.broker, "stringData", "url")
	setImage(t, deployment)
	b.fix(t, so)
	return secret, deployment, so
}

// scaledJobExample loads <dir>/scaledjob.yaml with the worker example's Secret: what to apply,
// and the ScaledJob.
func (b exampleBroker) scaledJobExample(t testing.TB) (objs []*unstructured.Unstructured, sj *unstructured.Unstructured) {
	t.Helper()
	secret, _, _ := b.workerExample(t)
	objs = append(objs, secret)
	for _, o := range readExample(t, b.dir+"/scaledjob.yaml") {
		if o.GetKind() == "ScaledJob" {
			sj = o
			setImage(t, sj)
			b.fix(t, sj)
		}
		objs = append(objs, o)
	}
	if sj == nil {
		t.Fatalf("%s/scaledjob.yaml has no ScaledJob", b.dir)
	}
	return objs, sj
}

// waitDrained waits until the scaler reads 0 on the worker example's queues.
func (b exampleBroker) waitDrained(t testing.TB) time.Time {
	t.Helper()
	return waitDepthZeroQueues(t, b.broker, b.queues, b.probe...)
}
