// fimntk dashboard: the log-scale toggles and the compare button. First-party, no library.
"use strict";

document.querySelectorAll(".scaled").forEach((box) => {
  const toggle = box.querySelector(".log-toggle");
  const linear = box.querySelector(".linear");
  const log = box.querySelector(".log");
  toggle.addEventListener("change", () => {
    linear.hidden = toggle.checked;
    log.hidden = !toggle.checked;
  });
});

const compare = document.getElementById("compare");
if (compare) {
  const button = compare.querySelector("button");
  const update = () => {
    const picked = compare.querySelectorAll("input.pick:checked").length;
    button.disabled = picked < 1 || picked > 8;
    button.textContent = picked ? `Compare ${picked} selected` : "Compare selected";
  };
  compare.addEventListener("change", update);
  update();
}
