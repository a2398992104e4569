"""cni_macvtap.package_init: the daemon imports pyroute2's IPRoute and prometheus_client's metric classes
without their packages' ``__init__`` (every other API they have), and code that asks for the whole
package still gets it. Each check runs in a fresh interpreter (sys.modules is the subject)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(code: str) -> None:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_links_import_iproute_without_the_rest_of_pyroute2() -> None:
    run(
        "import sys\n"
        "from cni_macvtap import links\n"
        "assert 'pyroute2.iproute.linux' in sys.modules\n"
        "assert not {'pyroute2.ndb.main', 'pyroute2.ipdb', 'pyroute2.conntrack'} & set(sys.modules)\n"
        "print('ok')\n"
    )


def test_metrics_import_without_the_http_exposition() -> None:
    run(
        "import sys\n"
        "from cni_macvtap import metrics\n"
        "assert 'prometheus_client.multiprocess' in sys.modules\n"
        "assert 'prometheus_client.exposition' not in sys.modules and 'urllib.request' not in sys.modules\n"
        "print('ok')\n"
    )


def test_asking_for_a_package_name_runs_its_init() -> None:
    run(
        "import sys\n"
        "from cni_macvtap import links\n"
        "from pyroute2 import NDB, IPRoute\n"
        "import pyroute2\n"
        "assert IPRoute is links.IPRoute and 'pyroute2.ndb.main' in sys.modules\n"
        "assert '__getattr__' not in vars(pyroute2) and pyroute2.__version__\n"
        "print('ok')\n"
    )


def test_a_missing_name_is_still_an_attribute_error() -> None:
    run(
        "from cni_macvtap import package_init\n"
        "package_init.skip_init('pyroute2')\n"
        "import pyroute2\n"
        "try:\n"
        "    pyroute2.no_such_name\n"
        "except AttributeError:\n"
        "    print('ok')\n"
    )


@pytest.mark.parametrize("name", ["colorsys", "no_such_package_xyz"])
def test_a_plain_module_or_a_missing_package_is_left_alone(name: str) -> None:
    run(
        "import sys\n"
        "from cni_macvtap import package_init\n"
        f"package_init.skip_init({name!r})\n"
        f"assert {name!r} not in sys.modules\n"
        "print('ok')\n"
    )
