// sd-webui-ti-trainer: the Train/Resume buttons get a task id and poll the host's progress API,
// the same mechanism txt2img and the built-in trainer use (live preview, textinfo, ETA).

function ti_trainer_start() {
    gradioApp().querySelector('#ti_trainer_outcome').innerHTML = '';

    var id = randomId();
    requestProgress(id, gradioApp().getElementById('ti_trainer_output'), gradioApp().getElementById('ti_trainer_gallery'), function() {}, function(progress) {
        if (progress.textinfo) {
            gradioApp().getElementById('ti_trainer_progress').innerHTML = progress.textinfo;
        }
    });

    var res = Array.from(arguments);
    res[0] = id;
    return res;
}
