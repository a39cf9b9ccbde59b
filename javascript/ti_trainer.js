// sd-webui-ti-trainer: the Train/Resume buttons get a task id and poll the host's progress API,
// the same mechanism txt2img and the built-in trainer use (progress bar, live preview, ETA).
// The step/loss summary goes into a div of our own: writing into a Gradio component's root
// would detach the nodes Gradio renders its next output into.

function ti_trainer_live() {
    return gradioApp().querySelector('#ti_trainer_progress .ti-trainer-live');
}

function ti_trainer_start() {
    var live = ti_trainer_live();
    var id = randomId();
    requestProgress(id, gradioApp().getElementById('ti_trainer_output'), gradioApp().getElementById('ti_trainer_gallery'), function() {
        if (live) live.innerHTML = '';  // the final summary arrives with the outcome
    }, function(progress) {
        if (live && progress.textinfo) live.innerHTML = progress.textinfo;
    });

    var res = Array.from(arguments);
    res[0] = id;
    return res;
}
