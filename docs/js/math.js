// Typesets the formulas that pymdownx.arithmatex (generic mode) leaves in the page, with the KaTeX copy
// vendored in js/katex. Inline math arrives as <span class="arithmatex">\(...\)</span>, display math as
// <div class="arithmatex">\[...\]</div>.
(function () {
  "use strict";
  var delimiters = [
    { left: "\\(", right: "\\)", display: false },
    { left: "\\[", right: "\\]", display: true },
  ];

  function typeset() {
    if (typeof renderMathInElement !== "function") {
      return;
    }
    var nodes = document.querySelectorAll(".arithmatex");
    for (var i = 0; i < nodes.length; i++) {
      renderMathInElement(nodes[i], { delimiters: delimiters, throwOnError: false });
    }
  }

  // Material's instant navigation swaps pages without a reload and announces each through document$
  if (typeof document$ !== "undefined" && typeof document$.subscribe === "function") {
    document$.subscribe(typeset);
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", typeset);
  } else {
    typeset();
  }
})();
