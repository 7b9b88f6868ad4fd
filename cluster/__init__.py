"""KubeRay on GKE: our cluster's objects, built from one YAML config, and the API calls.

Pure builders: config.py (the YAML) -> pods.py (shared pod pieces), raycluster.py
(RayCluster, RayJob), rbac.py (namespace, service accounts, Role, RoleBinding), triton.py
(Triton Deployment and Service for serving/kubernetes.py). diagnose.py reads state back (pure).
kubeapi.py is the one module that talks to the API. `python -m cluster` is the CLI.
"""
