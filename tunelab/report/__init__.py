"""Reports of tunelab studies: HTML (self-contained), Markdown, PNG plots and CSV.

    write_report(study, Path("reports") / study.study_name)      -> .../index.html
    write_comparison([study_a, study_b], Path("reports/a-vs-b"))  -> .../index.html

Tables are pure functions of the trial records (`tunelab.report.data`, `.compare`); plots are
drawn from them (`.plots`, matplotlib without pyplot) and both renderers (`.render`) lay out the
same sections. No torch here.
"""

from tunelab.report.build import write_comparison, write_report

__all__ = ["write_comparison", "write_report"]
