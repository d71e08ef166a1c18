"""Keep-ratio schedules (ssProp) and epoch-sampling strategies (GradSamp): pure functions of progress."""
