"""nezha-deploy: export and serve NEZHA generative recommenders.

The import package maps the repository's folders (pyproject.toml's package-dir; the install must be
editable, ``pip install -e .``): ``nezha`` (nezha/: this file and the ``nezha`` command), ``nezha.runtime``
(runtime/), ``nezha.export`` (export/), ``nezha.calibration`` (calibration/), ``nezha.model`` (model/,
torch) and ``nezha.bench`` (bench/).
"""

__version__ = "0.1.0"
