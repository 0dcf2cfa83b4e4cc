{{/*
The rules of largemodel.operator.rbac.RULES, one for one (tests/packaging/test_rbac.py fails when
they differ). Each says why the operator needs it.
*/}}
{{- define "largemodel.rules" -}}
# Watch LargeModels and keep kopf's progress annotations and finalizer on them.
- apiGroups: ["serving.largemodel.io"]
  resources: ["largemodels"]
  verbs: ["get", "list", "watch", "patch"]
# Write phase, conditions, plan and group readiness.
- apiGroups: ["serving.largemodel.io"]
  resources: ["largemodels/status"]
  verbs: ["get", "patch"]
# One StatefulSet per rank group: created, rolled by recreation, removed on scale down.
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The headless ranks Service and the client Service.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Group health: a failed, deleted or restarted rank pod recreates its whole group.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "delete"]
# Events for every decision a user wants to see.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.rbac.readSecrets }}
# Asked for by rbac.readSecrets (not needed by the operator itself).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
{{- end }}
{{- end -}}
