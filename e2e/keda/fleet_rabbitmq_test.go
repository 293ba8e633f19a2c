package e2e

import (
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/harness"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// BenchmarkRabbitMQFleet: what idle and active ScaledObjects ask of RabbitMQ, ours beside KEDA's
// `rabbitmq` scaler. CKS_E2E_FLEET_SETS (default 100) ScaledObjects, one per queue `fleet-<i>`,
// in a vhost of the benchmark's own on the suite's RabbitMQ, all reaching the node through
// counting proxies: the AMQP methods the clients send (passive `queue.declare` leaves no trace in
// RabbitMQ's own statistics) and the management API requests. Variants, one after the other
// (CKS_E2E_FLEET_VARIANTS: ours, builtin, builtin5): our trigger (`external-push`, the queue and
// the management API through the proxies, served by a scaler process of the benchmark's own), then
// KEDA's `rabbitmq` scaler (QueueLength over AMQP) at pollingInterval 30 s (KEDA's default) and
// 5 s. Each is measured CKS_E2E_FLEET_SECONDS (default 60) idle, then the activation inside the
// idle fleet CKS_E2E_FLEET_TRIALS times, then the same window active (5 tasks per queue, every
// Deployment at 1 replica). Run it with:
//
//	CKS_E2E_FLEET_VARIANTS=ours,builtin bash e2e/scripts/run.sh -run '^$' -bench RabbitMQFleet -benchtime 1x -timeout 60m
func BenchmarkRabbitMQFleet(b *testing.B) {
	sets, trials := envInt("CKS_E2E_FLEET_SETS", 100), envInt("CKS_E2E_FLEET_TRIALS", 10)
	if trials > sets {
		trials = sets
	}
	window := time.Duration(envInt("CKS_E2E_FLEET_SECONDS", 60)) * time.Second
	amqpURL, mgmt := harness.RabbitVhost(b, "fleet-rabbitmq")
	direct, err := url.Parse(amqpURL)
	if err != nil {
		b.Fatal(err)
	}
	amqp := harness.StartAMQPCounter(b, direct.Host)
	api := harness.StartHTTPCounter(b, mgmt)
	proxied := *direct
	proxied.Host = amqp.Addr
	apiURL, _ := url.Parse(api.URL)
	apiURL.User = url.UserPassword("guest", "guest")

	pub := harness.NewPublisher(b, amqpURL) // straight to the node: not counted
	queues := make([]string, sets)
	for i := range queues {
		queues[i] = fmt.Sprintf("fleet-%d", i)
		pub.Publish(b, queues[i], 1, 0) // declares the queue as Celery does
	}
	pub.Purge(b, queues...)
	scaler, err := harness.StartScaler("scaler-rabbitmq-fleet", nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(scaler.Stop)
	example := harness.ReadExample(b, "deploy/examples/rabbitmq/worker.yaml")
	secret, deployment := harness.Find(b, example, "Secret"), harness.Find(b, example, "Deployment")
	harness.Set(b, secret, proxied.String(), "stringData", "url") // KEDA resolves the Deployment's env
	harness.SetImage(b, deployment)
	rabbitPid := rabbitmqPid(b)

	variants := []string{"ours", "builtin", "builtin5"}
	if v := os.Getenv("CKS_E2E_FLEET_VARIANTS"); v != "" {
		variants = strings.Split(v, ",")
	}
	for n := 0; n < b.N; n++ {
		for _, variant := range variants {
			ns := harness.Namespace(b, fmt.Sprintf("rfleet-%d-%s", n, variant))
			harness.Apply(b, ns, secret)
			for i, q := range queues {
				name := fmt.Sprintf("w-%d", i)
				var so *unstructured.Unstructured
				switch variant {
				case "ours":
					so = harness.NewScaledObject(name, name, "external-push", 30, 300, map[string]any{
						"scalerAddress": scaler.Addr, "brokerUrl": proxied.String(), "managementUrl": apiURL.String(),
						"queues": q, "queueLength": "5",
					})
				case "builtin", "builtin5":
					polling := int64(30)
					if variant == "builtin5" {
						polling = 5
					}
					so = harness.NewScaledObject(name, name, "rabbitmq", polling, 300, map[string]any{
						"host": proxied.String(), "queueName": q, "mode": "QueueLength", "value": "5", "protocol": "amqp",
					})
				default:
					b.Fatalf("CKS_E2E_FLEET_VARIANTS: unknown variant %q", variant)
				}
				harness.Apply(b, ns, harness.CopyDeployment(b, deployment, name), so)
			}
			waitFleetReady(b, []string{ns}, sets)
			idle := measureRabbit(b, variant+" idle", scaler, rabbitPid, amqp, api, window)
			b.Logf("%s", idle)
			lat := fleetActivation(b, pub, ns, trials)
			// The activated queues hold 1 task each: emptied, so that 5 tasks make 1 replica.
			pub.Purge(b, queues[:trials]...)
			for _, q := range queues {
				pub.Publish(b, q, 5, 0)
			}
			waitFleetReplicas(b, []string{ns}, sets, 1, 5*time.Minute)
			active := measureRabbit(b, variant+" active", scaler, rabbitPid, amqp, api, window)
			p50, p90 := harness.Percentile(lat, 50), harness.Percentile(lat, 90)
			b.Logf("%s: activation inside the idle fleet, %d trials: p50 %.0f ms, p90 %.0f ms, max %.0f ms", variant, len(lat), harness.Ms(p50), harness.Ms(p90), harness.Ms(lat[len(lat)-1]))
			b.Logf("%s", active)
			for _, m := range []rabbitFigures{idle, active} {
				harness.WriteResult(b, "rabbitmq-fleet", map[string]any{
					"variant": m.name, "scaled_objects": sets, "amqp_methods_per_s": m.methodsPerSecond,
					"management_requests_per_s": m.requestsPerSecond, "methods": m.methods,
					"rabbitmq_cpu_pct": m.brokerCPU, "scaler_cpu_pct": m.scalerCPU, "operator_cpu_pct": m.operatorCPU,
				})
			}
			harness.WriteResult(b, "rabbitmq-fleet-activation", map[string]any{
				"variant": variant, "scaled_objects": sets, "trials": len(lat),
				"p50_ms": harness.Ms(p50), "p90_ms": harness.Ms(p90), "max_ms": harness.Ms(lat[len(lat)-1]),
			})
			deleteFleet(b, []string{ns})
			pub.Purge(b, queues...)
		}
	}
}

type rabbitFigures struct {
	name                                string
	methodsPerSecond, requestsPerSecond float64
	methods                             []string // per method over the window
	brokerCPU, scalerCPU, operatorCPU   float64  // percent of one core
}

func (f rabbitFigures) String() string {
	return fmt.Sprintf("%s: %.1f AMQP methods/s %v, %.1f management requests/s; RabbitMQ CPU %.1f%%, scaler CPU %.1f%%, operator CPU %.1f%%",
		f.name, f.methodsPerSecond, f.methods, f.requestsPerSecond, f.brokerCPU, f.scalerCPU, f.operatorCPU)
}

// measureRabbit counts what went through the proxies over window, and the CPU of the RabbitMQ
// node (the suite's: other users of the node count too), the scaler and KEDA's operator.
func measureRabbit(b testing.TB, name string, s *harness.ScalerProcess, rabbitPid int, amqp *harness.AMQPCounter, api *harness.HTTPCounter, window time.Duration) rabbitFigures {
	b.Helper()
	operatorPid := harness.Kube.Pid("operator")
	m0, r0 := amqp.Methods(), api.Requests()
	c0b, c0s, c0o := cpuTicks(b, rabbitPid), cpuTicks(b, s.Pid()), cpuTicks(b, operatorPid)
	t0 := time.Now()
	time.Sleep(window)
	m1, r1 := amqp.Methods(), api.Requests()
	c1b, c1s, c1o := cpuTicks(b, rabbitPid), cpuTicks(b, s.Pid()), cpuTicks(b, operatorPid)
	secs := time.Since(t0).Seconds()
	var total int64
	for k, v := range m1 {
		total += v - m0[k]
	}
	pct := func(t0, t1 int64) float64 { return float64(t1-t0) / clockTicks / secs * 100 }
	return rabbitFigures{
		name: name, methodsPerSecond: float64(total) / secs, requestsPerSecond: float64(r1-r0) / secs,
		methods: harness.MethodDelta(m0, m1), brokerCPU: pct(c0b, c1b), scalerCPU: pct(c0s, c1s), operatorCPU: pct(c0o, c1o),
	}
}

// rabbitmqPid is the Erlang VM of the suite's RabbitMQ node (the oldest beam.smp).
func rabbitmqPid(b testing.TB) int {
	b.Helper()
	out, err := exec.Command("pgrep", "-o", "beam.smp").Output()
	if err != nil {
		b.Fatalf("no RabbitMQ node (beam.smp) found: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		b.Fatal(err)
	}
	return pid
}
