package harness

import (
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// ExampleBroker is one broker's examples (deploy/examples/<name>) made to run on this machine, in
// a place of the test's own: a leased Redis database, a RabbitMQ vhost of the test, an SQS
// queue-name prefix of the test.
type ExampleBroker struct {
	Name   string
	Broker string   // the Celery broker URL
	Env    []string // cks_app environment for publishers and workers
	Probe  []string // trigger keys `probe` needs besides brokerUrl and queues
	Queues string   // the worker example's queues, as its trigger names them
	// PushBound is how long after publishing a push-activated trigger must reach 1 replica: the
	// scaler's stream poll (200 ms on Redis and RabbitMQ, 5 s on SQS, where every read is billed)
	// plus the push and KEDA's /scale, which took up to 1.05 s on 2 cores while the Rust suites
	// and the image ran beside the KEDA suite. A lost push is found all the same: the scenarios
	// poll every 5 s, so an activation left to KEDA's own polling takes 2.5 s on average and
	// more than 1.5 s 70% of the time, in each of the scenario's cycles.
	PushBound time.Duration
	Dir       string
	// Fix sets scalerAddress (the suite's scaler) and the broker's keys on a trigger.
	Fix func(t testing.TB, o *unstructured.Unstructured)
	// SQS is the endpoint and queue prefix (SQS only).
	SQS SQS
	// Markers is a Redis URL where tasks count their starts (Redis only: the broker itself).
	Markers string
}

// BrokerNames are the brokers every broker-independent promise is proven on.
var BrokerNames = []string{"redis", "rabbitmq", "sqs"}

// NewExampleBroker is a broker of the suite's, in a place of the test's own.
func NewExampleBroker(t testing.TB, name, ns string) ExampleBroker {
	t.Helper()
	return NewExampleBrokerAt(t, name, ns, "")
}

// NewExampleBrokerAt is NewExampleBroker on a server of the test's own: endpoint is the Redis URL
// (with its database) or the SQS endpoint; RabbitMQ always uses the suite's server, in a vhost of
// the test.
func NewExampleBrokerAt(t testing.TB, name, ns, endpoint string) ExampleBroker {
	t.Helper()
	b := ExampleBroker{Name: name, Dir: "deploy/examples/" + name, PushBound: 1500 * time.Millisecond}
	switch name {
	case "redis":
		b.Broker, b.Queues = endpoint, "celery,priority"
		if endpoint == "" {
			b.Broker = LeaseRedisDB(t).URL
		}
		b.Markers = b.Broker
		b.Fix = func(t testing.TB, o *unstructured.Unstructured) {
			SetTrigger(t, o, "scalerAddress", Scaler.Addr)
		}
	case "rabbitmq":
		amqp, mgmt := RabbitVhost(t, ns)
		b.Broker, b.Queues, b.Probe = amqp, "celery", []string{"managementUrl=" + mgmt}
		b.Fix = func(t testing.TB, o *unstructured.Unstructured) {
			SetTrigger(t, o, "scalerAddress", Scaler.Addr)
			SetTrigger(t, o, "managementUrl", mgmt)
			if o.GetKind() == "ScaledObject" {
				// The example's `priority` queue is declared by its workers: a queue that does
				// not exist yet is an error on RabbitMQ, and no worker runs before the test's.
				SetTrigger(t, o, "queues", "celery")
			}
		}
	case "sqs":
		s := NewSQS(t, endpoint)
		b.SQS = s
		b.Broker, b.Queues, b.Env, b.Probe = s.Broker, "celery", []string{s.Env()}, s.ProbeArgs()
		b.PushBound = 6 * time.Second
		b.Fix = func(t testing.TB, o *unstructured.Unstructured) {
			SetTrigger(t, o, "scalerAddress", Scaler.Addr)
			SetTrigger(t, o, "queueNamePrefix", s.Prefix)
			SetTrigger(t, o, "awsRegion", "us-east-1")
			if o.GetKind() == "ScaledObject" {
				SetTrigger(t, o, "queues", "celery") // the example's are orders,orders.high
			}
		}
	default:
		t.Fatalf("no broker %q", name)
	}
	return b
}

// ForEachBroker runs scenario once per broker, each a parallel subtest in a namespace and a place
// on the broker of its own.
func ForEachBroker(t *testing.T, scenario func(t *testing.T, b ExampleBroker, ns string)) {
	for _, name := range BrokerNames {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			ns := Namespace(t, NSName(t, ""))
			scenario(t, NewExampleBroker(t, name, ns), ns)
		})
	}
}

// Publisher is a publisher on the broker, in the test's place.
func (b ExampleBroker) Publisher(t testing.TB) *Publisher {
	t.Helper()
	return NewPublisher(t, b.Broker, b.Env...)
}

// Worker runs a Celery worker on the example's queues (celery, priority).
func (b ExampleBroker) Worker(t testing.TB, concurrency int) {
	t.Helper()
	env := b.Env
	if b.Markers != "" {
		env = append([]string{"CKS_MARKER_REDIS=" + b.Markers}, env...)
	}
	StartWorkerEnv(t, b.Broker, []string{"celery", "priority"}, concurrency, env...)
}

// WorkerExample loads <dir>/worker.yaml: its Secret (with this machine's broker URL), Deployment
// and ScaledObject.
func (b ExampleBroker) WorkerExample(t testing.TB) (secret, deployment, so *unstructured.Unstructured) {
	t.Helper()
	objs := ReadExample(t, b.Dir+"/worker.yaml")
	secret, deployment, so = Find(t, objs, "Secret"), Find(t, objs, "Deployment"), Find(t, objs, "ScaledObject")
	Set(t, secret, b.Broker, "stringData", "url")
	SetImage(t, deployment)
	b.Fix(t, so)
	return secret, deployment, so
}

// ScaledJobExample loads <dir>/scaledjob.yaml with the worker example's Secret: what to apply,
// and the ScaledJob.
func (b ExampleBroker) ScaledJobExample(t testing.TB) (objs []*unstructured.Unstructured, sj *unstructured.Unstructured) {
	t.Helper()
	secret, _, _ := b.WorkerExample(t)
	objs = append(objs, secret)
	for _, o := range ReadExample(t, b.Dir+"/scaledjob.yaml") {
		if o.GetKind() == "ScaledJob" {
			sj = o
			SetImage(t, sj)
			b.Fix(t, sj)
		}
		objs = append(objs, o)
	}
	if sj == nil {
		t.Fatalf("%s/scaledjob.yaml has no ScaledJob", b.Dir)
	}
	return objs, sj
}

// WaitDrained waits until the scaler reads 0 on the worker example's queues.
func (b ExampleBroker) WaitDrained(t testing.TB) time.Time {
	t.Helper()
	return WaitDepthZeroQueues(t, b.Broker, b.Queues, b.Probe...)
}

// RedisWorkerExample loads deploy/examples/redis/worker.yaml with only what this machine needs
// changed: the broker URL in the Secret (a database of the test's), the image (never pulled: no
// kubelet) and scalerAddress (the suite's scaler).
func RedisWorkerExample(t testing.TB, broker string) (secret, deployment, scaledObject *unstructured.Unstructured) {
	t.Helper()
	objs := ReadExample(t, "deploy/examples/redis/worker.yaml")
	if len(objs) != 3 {
		t.Fatalf("deploy/examples/redis/worker.yaml has %d objects, the scenario expects Secret, Deployment, ScaledObject", len(objs))
	}
	secret, deployment, scaledObject = Find(t, objs, "Secret"), Find(t, objs, "Deployment"), Find(t, objs, "ScaledObject")
	Set(t, secret, broker, "stringData", "url")
	SetImage(t, deployment)
	SetTrigger(t, scaledObject, "scalerAddress", Scaler.Addr)
	return secret, deployment, scaledObject
}

// OwnRedis is a redis-server of one test alone, so that it can be stopped: SHUTDOWN SAVE keeps
// its data in Dir, and a restart on the same port loads it again.
type OwnRedis struct {
	Port int
	Dir  string
}

// Start starts the server (on a free port the first time, on the same port and data after).
func (r *OwnRedis) Start(t testing.TB) {
	t.Helper()
	if r.Port == 0 {
		p, err := process.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		r.Port, r.Dir = p, t.TempDir()
	}
	out, err := exec.Command("redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", strconv.Itoa(r.Port),
		"--dir", r.Dir, "--save", "", "--appendonly", "no", "--logfile", filepath.Join(r.Dir, "redis.log")).CombinedOutput()
	if err != nil {
		t.Fatalf("redis-server: %v: %s", err, out)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if out, err := exec.Command("redis-cli", "-p", strconv.Itoa(r.Port), "ping").Output(); err == nil && string(out) == "PONG\n" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("own redis-server on %d did not answer PING", r.Port)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Stop shuts the server down (SHUTDOWN SAVE) and waits until it no longer answers.
func (r *OwnRedis) Stop(t testing.TB) {
	t.Helper()
	// Exits with an error status when the connection drops at shutdown: that is the success case.
	_ = exec.Command("redis-cli", "-p", strconv.Itoa(r.Port), "shutdown", "save").Run()
	deadline := time.Now().Add(20 * time.Second)
	for exec.Command("redis-cli", "-p", strconv.Itoa(r.Port), "ping").Run() == nil {
		if time.Now().After(deadline) {
			t.Fatalf("own redis-server on %d did not stop", r.Port)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
