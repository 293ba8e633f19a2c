// Package e2e is the end-to-end suite in which the real KEDA operator and metrics apiserver, on a
// real kube-apiserver and kube-controller-manager (package cluster), call the scaler and scale
// Deployments and ScaledJobs from its answers. The tests are in *_test.go; run them through
// e2e/scripts/run.sh (or the project's test command), which builds and finds everything they need.
package e2e
