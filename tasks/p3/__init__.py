"""P3 / T0 tasks from promptsource templates, without promptsource.

  templates  promptsource's `templates.yaml` files, read directly and rendered with jinja2 as promptsource does
  datasets   the dataset-name lists (T0's training datasets, MTest11) and the held-out datasets' raw data
  render     one (example, template) -> the feature contract; rank-classification expansion
  register   `register_p3_eval` (T0's held-out evaluation), `register_p3_train` (training tasks, T0 mixing rates)
"""
