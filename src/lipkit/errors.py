"""The one exception type for mistakes a user can make and fix."""


class UserError(Exception):
    """A problem caused by input the user controls (config, paths, data).

    The message is one sentence that names the thing and the fix; the CLI prints it without a
    traceback and exits with status 2.
    """


EXIT_PREEMPTED = 75  # a signal stopped training after it wrote a checkpoint: resume with train.resume=auto
