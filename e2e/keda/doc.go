// Package e2e is the end-to-end suite in which the real KEDA operator and metrics apiserver, on a
// real kube-apiserver and kube-controller-manager (package cluster), call the scaler and scale
// Deployments and ScaledJobs from its answers. The scenarios are in *_test.go, written with package
// harness (objects, waits, Celery, each test's place on the brokers). Most run in parallel
// (t.Parallel), each in namespaces and places on the brokers of its own; TestBrokerOutage, which
// stops brokers, and TestPushNeverLost, which asserts latencies, run first, alone. Run them through e2e/scripts/run.sh (or the project's test
// command), which builds and finds everything they need.
package e2e
