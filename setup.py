"""Builds the one compiled part, which is optional: `augsvc.datasets._jpegregion` decodes only the
region of a JPEG a random crop reads (libjpeg-turbo's partial decompression, the system's
libjpeg). Where it cannot be built (no compiler or no libjpeg headers), the package installs
without it and workers decode whole images: the same pixels, more slowly."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("augsvc.datasets._jpegregion", ["augsvc/datasets/_jpegregion.c"], libraries=["jpeg"],
                             extra_compile_args=["-O2"], optional=True)])
