"""The reconstruction engine: plain torch below ``reconstruction.py``, testable without Hydra.

Data flow of one reconstruction, one file per step::

    targets.py          stacked target features (name -> (B, ...)), checked against the encoder
    params.py           the parameter: pixels, a generator's input code (init, bounds), or
                        the image's decorrelated 1/f Fourier spectrum (a weight-free prior)
    transforms.py       optional random jitter / scale / rotation before the encoder
    (icnn_pl.nets)      generator -> crop -> encoder taps, stopping after the deepest target
    objective.py        weighted per-layer losses with masks
    schedules.py        iteration budget and linear schedules (lr, momentum, decay, blur)
    icnn_steps.py       the iCNN operations around a gradient step (normalise, decay, blur, clips)
    lbfgsb.py           scipy L-BFGS-B with box bounds, the other update
    evaluate_only.py    no update: one evaluation of the start (the dgn_direct baseline)
    reconstruction.py   the LightningModule that runs one iteration after another
    recipe.py           a method as data (Recipe) and the one builder of a Reconstruction
    fit.py              a lean Trainer per reconstruction
    functional.py       the reference-style API behind icnn_pl.icnn_gd & co
    interrupt.py        Ctrl-C stops between iterations
"""
