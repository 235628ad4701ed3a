#!/usr/bin/env python3
"""Renders deploy/helm/strata with Helm's own engine (the helm-python-sdk
package binds Helm's Go SDK, so no helm binary is needed), lints it, and
validates every rendered manifest offline against the Kubernetes OpenAPI
schemas (kubernetes-validate, strict: unknown fields are errors).

    check_chart.py            # check: render, lint, validate, compare with the checked-in copies
    check_chart.py --update   # rewrite deploy/helm/rendered/*.yaml from the chart

The rendered copies (deploy/helm/rendered/{embedded,etcd,tls}.yaml) are for
readers and for `kubectl apply` without helm; the check fails when they are
not what the chart renders now. Called by scripts/check-deploy.sh.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy/helm/strata"
RENDERED = ROOT / "deploy/helm/rendered"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the
# newest the schemas know.
K8S_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]

# Prometheus Operator kinds have no schema in kubernetes-validate; these
# minimal schemas hold them to the fields the operator requires.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "$defs": {
            "secretKeySelector": {
                "type": "object",
                "required": ["name", "key"],
                "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
            },
            "secretOrConfigMap": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "secret": {"$ref": "#/$defs/secretKeySelector"},
                    "configMap": {"$ref": "#/$defs/secretKeySelector"},
                },
            },
        },
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "jobLabel": {"type": "string"},
                    "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "scheme": {"enum": ["http", "https"]},
                                "tlsConfig": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "serverName": {"type": "string"},
                                        "ca": {"$ref": "#/$defs/secretOrConfigMap"},
                                        "cert": {"$ref": "#/$defs/secretOrConfigMap"},
                                        "keySecret": {"$ref": "#/$defs/secretKeySelector"},
                                    },
                                },
                            },
                        },
                    },
                },
            }
        },
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "name": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": "string"},
                                            "for": {"type": "string"},
                                            "labels": {"type": "object"},
                                            "annotations": {"type": "object"},
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            }
        },
    },
}


def render(mode: str) -> str:
    """The chart rendered with ci/<mode>-values.yaml, as one multi-document file."""
    values = yaml.safe_load((CHART / "ci" / f"{mode}-values.yaml").read_text()) or {}
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name="strata", namespace="strata")
    out = [
        f"# Rendered from deploy/helm/strata with ci/{mode}-values.yaml (release \"strata\",\n"
        "# namespace \"strata\") by scripts/check_chart.py --update. Do not edit: change the\n"
        "# chart and re-render; CI fails when this file differs from the chart's output.\n"
    ]
    for path in sorted(manifests):
        body = manifests[path].strip()
        if path.endswith("NOTES.txt") or not body:
            continue
        for doc in body.split("\n---\n"):
            doc = doc.strip()
            if doc.startswith("---"):
                doc = doc[3:].strip()
            if doc and any(not line.startswith("#") for line in doc.splitlines()):
                out.append(f"---\n# Source: {path}\n{doc}\n")
    return "".join(out)


def validate(mode: str, text: str) -> list[str]:
    import jsonschema

    errors = []
    kinds = []
    for doc in yaml.safe_load_all(text):
        if doc is None:
            continue
        kind, api = doc.get("kind"), doc.get("apiVersion")
        name = f"{mode}: {kind}/{doc.get('metadata', {}).get('name')}"
        kinds.append(kind)
        schema = CRD_SCHEMAS.get((api, kind))
        if schema is not None:
            try:
                jsonschema.validate(doc, schema)
            except jsonschema.ValidationError as e:
                errors.append(f"{name}: {e.message}")
            if kind == "PrometheusRule":
                errors.extend(promtool_check(name, doc))
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{name} (Kubernetes {version}): {e.message} at {'.'.join(map(str, e.path))}")
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{name}: no Kubernetes {version} schema for {api} {kind}")
    print(f"{mode}: validated {len(kinds)} manifests: {', '.join(kinds)}")
    return errors


def promtool_check(name: str, doc: dict) -> list[str]:
    """The PrometheusRule's groups as a rule file must pass promtool."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump({"groups": doc["spec"]["groups"]}, f)
        f.flush()
        run = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
    return [] if run.returncode == 0 else [f"{name}: promtool: {run.stdout}{run.stderr}"]


def main() -> int:
    update = "--update" in sys.argv[1:]
    errors = []
    lint = helm.lint(str(CHART), strict=True)
    for message in lint.get("messages", []):
        # Severity 1 is INFO (e.g. "icon is recommended").
        if message.get("severity", 0) > 1:
            errors.append(f"helm lint: {message}")
    errors.extend(f"helm lint: {e}" for e in lint.get("errors", []))
    for mode in ("embedded", "etcd", "tls"):
        text = render(mode)
        errors.extend(validate(mode, text))
        target = RENDERED / f"{mode}.yaml"
        if update:
            target.write_text(text)
            print(f"wrote {target.relative_to(ROOT)}")
        elif not target.exists() or target.read_text() != text:
            errors.append(
                f"{target.relative_to(ROOT)} is not what the chart renders: "
                "run scripts/check-deploy.sh --update (or scripts/check_chart.py --update) and commit it"
            )
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
