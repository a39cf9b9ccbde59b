// sd-webui-ti-trainer: the Train Embedding tab's page script.
//
// A run lives on the server, not in the request that started it. While the tab is visible this script
// clicks the hidden Poll button (the run panel and previews come back from the server), and when a run
// is active it attaches the host's own progress bar and live preview to the run's task id
// (requestProgress, as txt2img does): after a page reload the active run shows again by itself.
// It also gives the tab the full width of the Train tab while it is the selected sub-tab.

var ti_trainer = {attached: null, timer: null, last: null, ended: {}, cards_stale: false};

function ti_trainer_el(name) {
    return gradioApp().getElementById('ti_trainer_' + name);
}

function ti_trainer_visible() {
    var tab = ti_trainer_el('tab');
    return !!(tab && tab.offsetParent !== null);
}

// Train/Resume: a fresh task id for the run (args[0]); the panel is polled soon after the answer.
function ti_trainer_start() {
    var res = Array.from(arguments);
    res[0] = randomId();
    ti_trainer_poll_soon();
    return res;
}

function ti_trainer_status() {
    var box = ti_trainer_el('status');
    var area = box && box.querySelector('textarea');
    try {
        return JSON.parse((area && area.value) || '{}');
    } catch (e) {
        return {};
    }
}

function ti_trainer_attach(status) {
    if (!status.active || !status.task_id || ti_trainer.attached === status.task_id) return;
    if (ti_trainer.ended[status.task_id]) return;  // a poll answer older than the end of its task
    var anchor = ti_trainer_el('progressbar');
    var live = ti_trainer_el('live');
    if (!anchor || typeof requestProgress !== 'function') return;
    // The host's settings not read yet (a page just loaded): its bar would come out hidden (show_progressbar).
    if (typeof opts === 'undefined' || opts.show_progressbar === undefined) return;
    ti_trainer.attached = status.task_id;
    if (live) live.classList.add('ti-trainer-live-on');
    var task = status.task_id;
    requestProgress(task, anchor, live, function() {
        ti_trainer.attached = null;
        ti_trainer.ended[task] = true;
        if (live) {
            live.classList.remove('ti-trainer-live-on');
            // requestProgress can still add a live preview whose image loads after its end: the previews
            // by step below hold every image, so the box is emptied.
            setTimeout(function() {
                live.querySelectorAll('.livePreview').forEach(function(node) {
                    node.remove();
                });
            }, 1500);
        }
        ti_trainer_poll_soon();  // the final state, outcome and previews
    }, null, 60);
}

// The host's Textual Inversion cards (txt2img, img2img) re-read the embeddings folder on their refresh, which
// reloads every embedding from disk: done when a run has ended (its live embedding is unregistered by then),
// so the new embedding and its checkpoints show with their previews without a manual refresh.
function ti_trainer_refresh_cards() {
    ['txt2img', 'img2img'].forEach(function(tab) {
        var button = gradioApp().getElementById(tab + '_textual_inversion_extra_refresh_internal');
        if (button) button.dispatchEvent(new Event('click'));
    });
}

function ti_trainer_tick() {
    var status = ti_trainer_status();
    if (ti_trainer.last && ti_trainer.last.active && ti_trainer.last.run_id === status.run_id && !status.active) {
        ti_trainer.cards_stale = true;
        // "Training x: the run panel below follows it" is over: the panel has the outcome (errors stay).
        var message = ti_trainer_el('message');
        if (message) message.querySelectorAll('.ti-trainer-info').forEach(function(node) {
            node.remove();
        });
    }
    // The cards' refresh is a queued host event (a websocket): done when the user may look at the cards (not
    // on our tab), else at the user's next tab click; a page closed or reloaded during its handshake logs a
    // WebSocketDisconnect traceback in the webui's console.
    if (ti_trainer.cards_stale && !ti_trainer_visible()) {
        ti_trainer.cards_stale = false;
        ti_trainer_refresh_cards();
    }
    ti_trainer.last = status;
    if (!ti_trainer_visible() && !status.active) return;  // an active run is followed from any tab
    var poll = ti_trainer_el('poll');
    if (poll) poll.click();
    ti_trainer_attach(status);
    // The poll's answer (a run found after a reload) attaches the bar as soon as it came, not at the next tick.
    [300, 700, 1200].forEach(function(ms) {
        setTimeout(function() {
            ti_trainer_attach(ti_trainer_status());
        }, ms);
    });
}

function ti_trainer_poll_soon() {
    [400, 1200, 2500].forEach(function(ms) {
        setTimeout(ti_trainer_tick, ms);
    });
}

// Full width: the host's own output column (ti_gallery_container) is hidden only while one of our
// sub-tabs is selected; other train tabs keep it.
function ti_trainer_layout() {
    var tabs = gradioApp().getElementById('train_tabs');
    if (!tabs) return;
    var ours = ['ti_trainer_tab', 'ti_trainer_dataset_tab'].some(function(id) {
        var tab = gradioApp().getElementById(id);
        return tab && tab.style.display !== 'none' && tabs.contains(tab);
    });
    var row = tabs.parentElement;
    if (row) row.classList.toggle('ti-trainer-wide', ours);
}

// The user's clicks only (a tab change may show or hide our tab): the hidden Poll button and the cards'
// refresh are clicked by this script, and a tick answering those clicks would click again, doubling the
// timers each time until the page's own timers, the host's progress bar among them, starve. (Not "a click
// inside .tab-nav": Gradio replaces the clicked tab button before the click bubbles up here.)
function ti_trainer_on_tab_click(event) {
    if (!event.isTrusted) return;
    setTimeout(ti_trainer_layout, 50);
    setTimeout(ti_trainer_tick, 60);
}

onUiLoaded(function() {
    ti_trainer_layout();
    ti_trainer_tick();
    ti_trainer.timer = setInterval(ti_trainer_tick, 1500);
    // #train_tabs lies inside #tabs: one listener sees the clicks of both.
    var top = gradioApp().getElementById('tabs') || gradioApp().getElementById('train_tabs');
    if (top) top.addEventListener('click', ti_trainer_on_tab_click);
});
