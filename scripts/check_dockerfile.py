#!/usr/bin/env python3
"""Checks deploy/docker/Dockerfile without a Docker daemon (CI has none):
parsed by Docker's own parser (PyPI `dockerfile`), then held to what the
image promises — a build stage with the Rust toolchain and protoc, a slim
runtime stage holding exactly stratad, strata-sidecar and strata, running
as a non-root user — and the build context excludes target/.
Called by scripts/check-deploy.sh."""

import re
import sys
from pathlib import Path

import dockerfile

ROOT = Path(__file__).resolve().parent.parent
BINARIES = ["stratad", "strata-sidecar", "strata"]


def main() -> int:
    commands = dockerfile.parse_file(str(ROOT / "deploy/docker/Dockerfile"))
    stages: list[list] = []
    for c in commands:
        if c.cmd == "FROM":
            stages.append([c])
        elif stages:
            stages[-1].append(c)
    errors = []
    if len(stages) < 2:
        errors.append(f"expected a multi-stage build, found {len(stages)} stage(s)")
        return report(errors)
    build, runtime = stages[0], stages[-1]
    if not build[0].value[0].startswith("rust:"):
        errors.append(f"the build stage should start from the rust image, not {build[0].value[0]}")
    build_runs = " ".join(" ".join(c.value) for c in build if c.cmd == "RUN")
    for package in ["protobuf-compiler", "libprotobuf-dev"]:
        if package not in build_runs:
            errors.append(f"the build stage does not install {package} (etcd-client runs protoc)")
    for crate in ["strata-server", "strata-sidecar", "strata-cli"]:
        if f"-p {crate}" not in build_runs:
            errors.append(f"the build stage does not build {crate}")
        manifest = {"strata-server": "server", "strata-sidecar": "sidecar", "strata-cli": "cli"}[crate]
        if f'name = "{crate}"' not in (ROOT / manifest / "Cargo.toml").read_text():
            errors.append(f"{manifest}/Cargo.toml is not the {crate} package")
    if "--locked" not in build_runs:
        errors.append("cargo build should use --locked")
    if not re.search(r"-slim$|distroless", runtime[0].value[0]):
        errors.append(f"the runtime stage should be slim, not {runtime[0].value[0]}")
    copies = [c for c in runtime if c.cmd == "COPY"]
    copied = [Path(src).name for c in copies for src in c.value[:-1]]
    if sorted(copied) != sorted(BINARIES) or any("--from=build" not in c.flags for c in copies):
        errors.append(f"the runtime stage should copy exactly {BINARIES} from the build stage, copies {copied}")
    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        errors.append("the runtime stage must end with a non-root USER")
    if not any(c.cmd == "STOPSIGNAL" and c.value[0] == "SIGTERM" for c in runtime):
        errors.append("STOPSIGNAL SIGTERM (stratad drains on it)")
    ignore = (ROOT / ".dockerignore").read_text().split()
    if "target/" not in ignore and "target" not in ignore:
        errors.append(".dockerignore should exclude target/ (gigabytes of build output)")
    return report(errors)


def report(errors: list[str]) -> int:
    for e in errors:
        print(f"error: Dockerfile: {e}", file=sys.stderr)
    if not errors:
        print("Dockerfile: multi-stage, slim non-root runtime with stratad, strata-sidecar, strata")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
