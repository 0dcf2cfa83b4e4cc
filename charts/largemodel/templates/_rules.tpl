{{/*
The rules of largemodel.operator.rbac.RULES, one for one (tests/packaging/test_chart_rbac.py fails
when they differ); operator/rbac.py says in detail why each verb is needed.
*/}}
{{- define "largemodel.rules" -}}
# Read each LargeModel, watch them all; patch: kopf's finalizer and the restart-history annotation.
- apiGroups: ["serving.largemodel.io"]
  resources: ["largemodels"]
  verbs: ["get", "list", "watch", "patch"]
# Status is written once per reconcile pass, only when it changed.
- apiGroups: ["serving.largemodel.io"]
  resources: ["largemodels/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion=true; clusters enforcing owner-reference
# permissions require update on the owner's finalizers for that.
- apiGroups: ["serving.largemodel.io"]
  resources: ["largemodels/finalizers"]
  verbs: ["update"]
# One StatefulSet per rank group: created, recreated (delete) when broken or outdated, removed on
# scale-down; patch records the group's member pods.
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# The headless ranks Service and the client Service: created when missing, drift patched back.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "create", "patch"]
# Pod health decides group health; pods are never written.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# An Event for every decision a user would want to see.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# The group Secret, created blind before a group starts; never read, listed or changed.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
# One NetworkPolicy per LargeModel: rank ports from its own pods only, API ports from allowFrom.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Gang scheduling: one PodGroup per group (scheduler-plugins or Volcano), created before its
# StatefulSet, drift patched back, deleted with the group or when the gang mode changes; listed per pass.
- apiGroups: ["scheduling.x-k8s.io"]
  resources: ["podgroups"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["scheduling.volcano.sh"]
  resources: ["podgroups"]
  verbs: ["list", "create", "patch", "delete"]
{{- if .Values.rbac.readSecrets }}
# Asked for by rbac.readSecrets: the operator itself never reads Secrets.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
{{- end }}
{{- end -}}

{{/*
largemodel.operator.rbac.CLUSTER_RULES: cluster-scoped reads, granted by a ClusterRole in every install.
*/}}
{{- define "largemodel.clusterRules" -}}
# Nodes feed the fit cache behind the Schedulable condition (allocatable GPUs, labels, taints); never written.
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list", "watch"]
{{- end -}}
