"""Render a kustomization of deploy/k8s without kubectl (the subset of kustomize these manifests use).

    python deploy/render.py deploy/k8s/overlays/gpu > gpu.yaml

Supported kustomization fields: resources (files and directories), namespace, labels (without
selectors), images, replicas, patches (strategic merge, including `$patch: delete` of a whole object or
of a list item, `null` to delete a field; JSON6902 add/remove/replace with a target). Anything else is
an error, so the manifests cannot drift outside what this renderer (and the test comparing it with
`kubectl kustomize`) understands. Transformers run in kustomize's order: patches, namespace, labels,
replicas, images.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "replicas", "patches"}
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "APIService",
}
# Strategic-merge keys of the list fields used here (from the Kubernetes API's patchMergeKey).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "imagePullSecrets": "name",
}


def render(kustomization_dir: str | Path) -> list[Obj]:
    """All objects of the kustomization in `kustomization_dir`, fully transformed."""
    root = Path(kustomization_dir)
    kust = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED_FIELDS
    if unknown:
        raise ValueError(f"{root}/kustomization.yaml: unsupported fields {sorted(unknown)}")
    objects: list[Obj] = []
    for entry in kust.get("resources", []):
        path = root / entry
        objects += render(path) if path.is_dir() else load_documents(path)
    for patch in kust.get("patches", []):
        objects = apply_patch(objects, patch, root)
    if "namespace" in kust:
        set_namespace(objects, kust["namespace"])
    for label_set in kust.get("labels", []):
        add_labels(objects, label_set)
    for replica in kust.get("replicas", []):
        set_replicas(objects, replica["name"], replica["count"])
    for image in kust.get("images", []):
        set_image(objects, image)
    return objects


def load_documents(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# -- patches ----------------------------------------------------------------------------------------


def apply_patch(objects: list[Obj], patch: Obj, root: Path) -> list[Obj]:
    text = (root / patch["path"]).read_text() if "path" in patch else patch["patch"]
    body = yaml.safe_load(text)
    target = patch.get("target")
    if isinstance(body, list):
        if target is None:
            raise ValueError("a JSON6902 patch needs a target")
        for obj in select(objects, target):
            for op in body:
                json6902(obj, op)
        return objects
    if target is None:
        target = {"kind": body["kind"], "name": body["metadata"]["name"]}
        target["group"] = group_of(body["apiVersion"])
    matched = select(objects, target)
    if not matched:
        raise ValueError(f"patch target {target} matches no object")
    if body.get("$patch") == "delete":
        return [obj for obj in objects if all(obj is not m for m in matched)]
    for obj in matched:
        merged = strategic_merge(obj, body)
        obj.clear()
        obj.update(merged)
    return objects


def group_of(api_version: str) -> str:
    return api_version.rpartition("/")[0]


def select(objects: list[Obj], target: Obj) -> list[Obj]:
    """Objects matching a kustomize patch target (kind, name, group, version; all optional)."""

    def matches(obj: Obj) -> bool:
        group, _, version = obj["apiVersion"].rpartition("/")
        checks = {"kind": obj["kind"], "name": obj["metadata"]["name"], "group": group, "version": version}
        return all(target[key] == value for key, value in checks.items() if key in target)

    return [obj for obj in objects if matches(obj)]


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """`patch` merged into a copy of `base` with Kubernetes strategic-merge semantics (our subset)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = strip_directives(copy.deepcopy(value))
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        return merge_list(base, patch, MERGE_KEYS[field])
    return strip_directives(copy.deepcopy(patch))


def merge_list(base: list[Obj], patch: list[Obj], key: str) -> list[Obj]:
    out = copy.deepcopy(base)
    for item in patch:
        index = next((i for i, old in enumerate(out) if old.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if index is not None:
                out.pop(index)
        elif index is None:
            out.append(strip_directives(copy.deepcopy(item)))
        else:
            out[index] = strategic_merge(out[index], item)
    return out


def strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_directives(v) for k, v in value.items() if not k.startswith("$patch")}
    if isinstance(value, list):
        return [strip_directives(v) for v in value]
    return value


def json6902(obj: Obj, op: Obj) -> None:
    """Apply one RFC 6902 operation (add, remove, replace) in place."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent: Any = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if op["op"] == "remove":
        parent.pop(int(last) if isinstance(parent, list) else last)
    elif op["op"] == "replace":
        if isinstance(parent, list):
            parent[int(last)] = op["value"]
        elif last not in parent:
            raise ValueError(f"replace of missing path {op['path']}")
        else:
            parent[last] = op["value"]
    elif op["op"] == "add":
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), op["value"])
        else:
            parent[last] = op["value"]
    else:
        raise ValueError(f"unsupported JSON6902 op {op['op']!r}")


# -- other transformers -------------------------------------------------------------------------------


def set_namespace(objects: list[Obj], namespace: str) -> None:
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED_KINDS:
            obj["metadata"]["namespace"] = namespace


def add_labels(objects: list[Obj], label_set: Obj) -> None:
    if label_set.get("includeSelectors") or label_set.get("includeTemplates"):
        raise ValueError("labels with includeSelectors/includeTemplates are outside the supported subset")
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(label_set["pairs"])


def set_replicas(objects: list[Obj], name: str, count: int) -> None:
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "ReplicaSet") and obj["metadata"]["name"] == name:
            obj["spec"]["replicas"] = count


def pod_containers(obj: Obj) -> list[Obj]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("containers", []) + pod.get("initContainers", [])


def set_image(objects: list[Obj], image: Obj) -> None:
    for obj in objects:
        for container in pod_containers(obj):
            name, tag = split_image(container["image"])
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{name}@{image['digest']}"
            else:
                new_tag = image.get("newTag", tag)
                container["image"] = f"{name}:{new_tag}" if new_tag else name


def split_image(image: str) -> tuple[str, str]:
    """("registry/name", "tag") of an image reference; a digest reference keeps its digest as tag."""
    if "@" in image:
        name, _, digest = image.partition("@")
        return name, digest
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:  # no tag, or the colon belonged to a registry port
        return image, ""
    return name, tag


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python deploy/render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    yaml.safe_dump_all(render(argv[1]), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
