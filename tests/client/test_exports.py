"""sealbox.client's public face: the image names are imported lazily (a cold ``sealbox sign``
never loads them), so the package lists them apart from ``_images.__all__``; the lists agree."""

from __future__ import annotations

import subprocess
import sys

from sealbox import client
from sealbox.client import _images


def test_the_lazy_image_names_are_exactly_the_image_modules_exports() -> None:
    assert set(_images.__all__) == client._IMAGES
    assert set(_images.__all__) <= set(client.__all__)
    for name in _images.__all__:
        assert getattr(client, name) is getattr(_images, name)


def test_importing_the_client_does_not_import_the_image_module() -> None:
    probe = "import sys, sealbox.client; print('sealbox.client._images' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
