"""Packaging: pyproject.toml holds the metadata; this only finds the packages, so a new technique
package needs no entry anywhere. export/ and kernels/ sit at the top level (the design card) and
install as effvision.export and effvision.kernels, for regular and editable installs alike."""
from setuptools import find_packages, setup

MAPPED = {"effvision.export": "export", "effvision.kernels": "kernels"}

setup(packages=[*find_packages(include=["effvision", "effvision.*"]), *MAPPED],
      package_dir={"effvision": "effvision", **MAPPED})
