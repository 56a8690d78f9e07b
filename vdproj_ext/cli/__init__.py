"""The command-line tools: argument parsing and printing over vdproj_ext.experiment.

    python -m vdproj_ext.train         (vdproj-train)     cli/train.py
    python -m vdproj_ext.generate      (vdproj-generate)  cli/generate.py
    python -m vdproj_ext.study         (vdproj-study)     cli/study.py
    python -m vdproj_ext.cli.data      export a preset's exact data splits
    python -m vdproj_ext.cli.report    re-render or merge report.md
"""
