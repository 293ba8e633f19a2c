// The CRDs of cert-manager and the Prometheus Operator, read from their module zips so that the
// project's manifests can be applied to the local API server. No package of these modules is built.
module github.com/celery-keda-scaler/e2e/crds

go 1.25.0

require (
	github.com/cert-manager/cert-manager v1.21.2
	github.com/prometheus-operator/prometheus-operator v0.85.0
)
