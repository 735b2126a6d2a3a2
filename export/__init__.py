"""``nezha.export`` (folder export/): the build. ``build.py`` declares the steps, ``steps.py`` holds them,
``graphs``/``precision``/``engines``/``tables`` make the files, ``validate`` compares them with PyTorch through
the runtime's own runners, ``staging`` writes the folder atomically. Needs torch (the ``export`` extra)."""
