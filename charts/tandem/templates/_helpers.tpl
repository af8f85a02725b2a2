{{- define "tandem.labels" -}}
app.kubernetes.io/name: tandem
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tandem.operatorSelector" -}}
app.kubernetes.io/name: tandem
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/*
The operator's rules on namespaced objects: a ClusterRole's when it watches
every namespace, a Role's in operator.watchNamespace otherwise.
*/}}
{{- define "tandem.operatorNamespacedRules" }}
  - apiGroups: ["tandem.dev"]
    resources: ["llamadeployments"]
    verbs: ["get", "list", "watch", "patch"]
  - apiGroups: ["tandem.dev"]
    resources: ["llamadeployments/status"]
    verbs: ["patch"]
  # Children carry blockOwnerDeletion, which clusters that enforce owner
  # reference permissions allow only to who may update the finalizers.
  - apiGroups: ["tandem.dev"]
    resources: ["llamadeployments/finalizers"]
    verbs: ["update"]
  - apiGroups: ["tandem.dev"]
    resources: ["llamashards"]
    verbs: ["list", "watch", "create", "patch", "delete"]
  # Never written by the operator: RBAC lets it grant agents (per-node
  # Roles) only what it holds itself.
  - apiGroups: ["tandem.dev"]
    resources: ["llamashards/status"]
    verbs: ["patch"]
  # Group-token and TLS Secrets it creates (watched by label, read by name
  # before any write so that a Secret it did not create is never touched).
  - apiGroups: [""]
    resources: ["secrets"]
    verbs: ["get", "list", "watch", "create", "patch"]
  # The per-node Roles and RoleBindings (label tandem.dev/node-access).
  - apiGroups: ["rbac.authorization.k8s.io"]
    resources: ["roles"]
    verbs: ["list", "watch", "create", "patch", "delete"]
  - apiGroups: ["rbac.authorization.k8s.io"]
    resources: ["rolebindings"]
    verbs: ["create", "patch", "delete"]
  - apiGroups: ["events.k8s.io"]
    resources: ["events"]
    verbs: ["create", "patch"]
{{- end }}
