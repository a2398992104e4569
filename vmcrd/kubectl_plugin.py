"""The kubectl-vm plugin: kubectl vm start|stop|restart|pause|unpause|mount|unmount|console NAME.

Every command is one write to the VirtualMachine that ``kubectl patch``/``kubectl annotate`` can do
as well; the plugin prints that equivalent command. What it writes:

========== ========================================================================================
start      ``spec.running: true``, or ``runStrategy: Always`` (was Halted), or the annotation
           ``edgevirt.io/state-request: start`` (Manual, RerunOnFailure, Once)
stop       ``spec.running: false``, or ``runStrategy: Halted`` (was Always), or the annotation
           ``edgevirt.io/state-request: stop`` (Manual, RerunOnFailure, Once)
restart    the annotation ``edgevirt.io/state-request: restart:<unique id>``
pause      ``spec.paused: true``; unpause: ``spec.paused: false``
mount      a JSON patch adding a ``hotpluggable: true`` volume to ``spec.volumes``
unmount    a JSON patch removing a hotpluggable volume from ``spec.volumes``
console    ``kubectl attach -it <name>-vm -c compute`` (the guest's serial console), or with
           ``--log`` ``kubectl logs -f`` of it
========== ========================================================================================

Flags: ``-n/--namespace``, ``--kubeconfig``, ``--context`` (kubectl does not pass its own to plugins).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from . import api
from .api import KubeObject
from .kube import api_client, api_message, kubeconfig_namespace


class PluginError(Exception):
    """A user-facing error: printed as ``error: ...`` with exit status 1."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # the connection flags are accepted before and after the command (kubectl users write both)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", default=argparse.SUPPRESS)
    common.add_argument("--kubeconfig", default=argparse.SUPPRESS)
    common.add_argument("--context", default=argparse.SUPPRESS)
    p = argparse.ArgumentParser(
        prog="kubectl vm", description="Start, stop, pause and mount volumes into VMs.", parents=[common]
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd, help_ in [
        ("start", "start the VM"),
        ("stop", "stop the VM (graceful shutdown)"),
        ("restart", "restart the VM (a new VM pod, same disks)"),
        ("pause", "suspend the guest"),
        ("unpause", "resume the guest"),
    ]:
        sp = sub.add_parser(cmd, help=help_, parents=[common])
        sp.add_argument("name")
    m = sub.add_parser(
        "mount", help="add a hotpluggable volume (attached live while it runs)", parents=[common]
    )
    m.add_argument("name")
    m.add_argument("--volume-name", required=True)
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--empty-disk", metavar="CAPACITY", help="a new blank disk, e.g. 1Gi")
    src.add_argument("--image", metavar="REF", help="a disk image reference")
    src.add_argument(
        "--host-disk",
        metavar="PATH",
        help="a file in the namespace's hostDisk folder of the node "
        "(/var/lib/edgevirt/hostdisks/<namespace>/), relative to it: e.g. data/a.img",
    )
    m.add_argument("--host-disk-type", choices=["Disk", "DiskOrCreate"], default="Disk")
    m.add_argument("--capacity", help="size for --host-disk-type DiskOrCreate")
    m.add_argument("--bus", choices=["virtio", "scsi"], help="virtio (default; scsi for --cdrom)")
    m.add_argument("--read-only", action="store_true")
    m.add_argument("--cdrom", action="store_true")
    u = sub.add_parser("unmount", help="remove a hotpluggable volume (detached live)", parents=[common])
    u.add_argument("name")
    u.add_argument("--volume-name", required=True)
    c = sub.add_parser("console", help="the guest's serial console", parents=[common])
    c.add_argument("name")
    c.add_argument("--log", action="store_true", help="follow the console log instead of attaching")
    args = p.parse_args(argv)
    for flag in ("namespace", "kubeconfig", "context"):
        setattr(args, flag, getattr(args, flag, None))
    return args


class Plugin:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        try:
            ac = api_client(args.kubeconfig, args.context, in_cluster=False)
            namespace = kubeconfig_namespace(args.kubeconfig, args.context)
        except Exception as e:
            raise PluginError(f"cannot load a kubeconfig ({e}); set KUBECONFIG or --kubeconfig") from None
        self.namespace = args.namespace or namespace or "default"
        self.custom = client.CustomObjectsApi(ac)

    # ------------------------------------------------------------------ API
    def get(self, name: str) -> KubeObject:
        try:
            vm = self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, self.namespace, api.PLURAL, name
            )
        except ApiException as e:
            if e.status == 404:
                raise PluginError(
                    f'virtualmachine "{name}" not found in namespace "{self.namespace}"'
                ) from None
            raise PluginError(api_message(e)) from None
        return cast(KubeObject, vm)  # the custom objects API answers JSON as a dict

    def merge(self, name: str, body: KubeObject) -> None:
        try:
            self.custom.patch_namespaced_custom_object(
                api.GROUP, api.VERSION, self.namespace, api.PLURAL, name, body
            )
        except ApiException as e:
            raise PluginError(api_message(e)) from None
        self.say(
            name,
            f"kubectl patch vm {name} -n {self.namespace} --type merge -p {shlex.quote(json.dumps(body))}",
        )

    def json_patch(self, name: str, ops: list[KubeObject]) -> None:
        try:
            self.custom.patch_namespaced_custom_object(
                api.GROUP,
                api.VERSION,
                self.namespace,
                api.PLURAL,
                name,
                ops,
                _content_type="application/json-patch+json",
            )
        except ApiException as e:
            raise PluginError(api_message(e)) from None
        self.say(
            name, f"kubectl patch vm {name} -n {self.namespace} --type json -p {shlex.quote(json.dumps(ops))}"
        )

    def say(self, name: str, equivalent: str) -> None:
        print(f"virtualmachine.edgevirt.io/{name} {self.args.command} requested")
        print(f"  (same as: {equivalent})", file=sys.stderr)

    def request(self, name: str, value: str) -> None:
        self.merge(name, {"metadata": {"annotations": {api.STATE_REQUEST: value}}})

    # ------------------------------------------------------------------ commands
    def start(self, vm: KubeObject) -> None:
        name, spec = vm["metadata"]["name"], vm.get("spec") or {}
        strategy = api.run_strategy(spec)
        if "runStrategy" not in spec:
            if spec.get("running"):
                raise PluginError(f"VM {name} is already set to run (spec.running: true)")
            return self.merge(name, {"spec": {"running": True}})
        if strategy == "Always":
            raise PluginError(f"VM {name} is already set to run (runStrategy: Always)")
        if strategy == "Halted":
            return self.merge(name, {"spec": {"runStrategy": "Always"}})
        return self.request(name, "start")

    def stop(self, vm: KubeObject) -> None:
        name, spec = vm["metadata"]["name"], vm.get("spec") or {}
        strategy = api.run_strategy(spec)
        if "runStrategy" not in spec:
            if not spec.get("running"):
                raise PluginError(f"VM {name} is already set to stop (spec.running is not true)")
            return self.merge(name, {"spec": {"running": False}})
        if strategy == "Halted":
            raise PluginError(f"VM {name} is already set to stop (runStrategy: Halted)")
        if strategy == "Always":
            return self.merge(name, {"spec": {"runStrategy": "Halted"}})
        return self.request(name, "stop")

    def restart(self, vm: KubeObject) -> None:
        name = vm["metadata"]["name"]
        st = (vm.get("status") or {}).get("printableStatus", api.STOPPED)
        if st == api.STOPPED or api.run_strategy(vm.get("spec") or {}) == "Halted":
            raise PluginError(f"VM {name} is not running ({st}): use kubectl vm start {name}")
        self.request(name, f"restart:{time.time_ns():x}")

    def pause(self, vm: KubeObject) -> None:
        self.merge(vm["metadata"]["name"], {"spec": {"paused": True}})

    def unpause(self, vm: KubeObject) -> None:
        name = vm["metadata"]["name"]
        if not (vm.get("spec") or {}).get("paused"):
            raise PluginError(f"VM {name} is not paused (spec.paused is not true)")
        self.merge(name, {"spec": {"paused": False}})

    def mount(self, vm: KubeObject) -> None:
        a = self.args
        bus = a.bus or ("scsi" if a.cdrom else "virtio")  # there is no virtio cdrom
        vol: dict[str, Any] = {"name": a.volume_name, "hotpluggable": True, "bus": bus}
        if a.empty_disk:
            vol["emptyDisk"] = {"capacity": a.empty_disk}
        elif a.image:
            vol["image"] = a.image
        else:
            vol["hostDisk"] = {"path": a.host_disk, "type": a.host_disk_type}
            if a.capacity:
                vol["hostDisk"]["capacity"] = a.capacity
        if a.read_only:
            vol["readOnly"] = True
        if a.cdrom:
            vol["cdrom"] = True
        vols = (vm.get("spec") or {}).get("volumes")
        if any(v["name"] == a.volume_name for v in vols or []):
            raise PluginError(f"VM {vm['metadata']['name']} already has a volume named {a.volume_name}")
        # the spec must be the one read (generation moves with spec changes only, not with the
        # status updates a running VM gets all the time)
        rv = {"op": "test", "path": "/metadata/generation", "value": vm["metadata"]["generation"]}
        op = (
            {"op": "add", "path": "/spec/volumes/-", "value": vol}
            if vols is not None
            else {"op": "add", "path": "/spec/volumes", "value": [vol]}
        )
        self.json_patch(vm["metadata"]["name"], [rv, op])

    def unmount(self, vm: KubeObject) -> None:
        name, vname = vm["metadata"]["name"], self.args.volume_name
        vols = (vm.get("spec") or {}).get("volumes") or []
        idx = next((i for i, v in enumerate(vols) if v["name"] == vname), None)
        if idx is None:
            raise PluginError(f"VM {name} has no volume named {vname}")
        if not vols[idx].get("hotpluggable"):
            raise PluginError(
                f"volume {vname} of VM {name} is not hotpluggable: edit spec.volumes and restart the VM"
            )
        self.json_patch(
            name,
            [
                {"op": "test", "path": f"/spec/volumes/{idx}/name", "value": vname},
                {"op": "remove", "path": f"/spec/volumes/{idx}"},
            ],
        )

    def console(self, vm: KubeObject) -> None:
        name = vm["metadata"]["name"]
        st = vm.get("status") or {}
        if not st.get("podName") or st.get("printableStatus") in (api.STOPPED, api.STOPPING):
            raise PluginError(f"VM {name} is {st.get('printableStatus', api.STOPPED)}: it has no console now")
        kubectl = shutil.which("kubectl")
        if not kubectl:
            raise PluginError("kubectl is not on PATH")
        cmd = [kubectl, "-n", self.namespace]
        if self.args.kubeconfig:
            cmd += ["--kubeconfig", self.args.kubeconfig]
        if self.args.context:
            cmd += ["--context", self.args.context]
        if self.args.log:
            cmd += ["logs", "-f", st["podName"], "-c", "compute"]
        else:
            cmd += ["attach", "-it", st["podName"], "-c", "compute"]
        os.execv(kubectl, cmd)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plugin = Plugin(args)
        vm = plugin.get(args.name)
        getattr(plugin, args.command)(vm)
    except PluginError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
