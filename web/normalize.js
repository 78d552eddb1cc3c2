// The server's rule for message content (messages.go, normalizeContent): lines end
// at LF, CR or CRLF; within a line each run of white space becomes one space, and
// the line is trimmed; blank lines are dropped. White space is Unicode's
// White_Space (which, unlike JavaScript's \s, includes U+0085 NEL) plus U+FEFF
// (the byte order mark, which \s includes and Unicode does not). Where the server
// accepts content, normalize gives what it stores; what the server refuses with
// 422 (control characters, nothing left, more than 480 characters) is not checked
// here. A lone surrogate, which JSON lets a string carry, becomes U+FFFD, as the
// server's JSON decoding makes it. testdata/normalize_cases.json holds the cases
// both are tested against.

const SPACE = /[\p{White_Space}\uFEFF]+/gu;

// normalize does to content what the server does before storing it.
export function normalize(content = '') {
  return content
    .toWellFormed()
    .split(/\r\n|\r|\n/)
    .map((line) => line.replace(SPACE, ' ').replace(/^ | $/g, ''))
    .filter((line) => line !== '')
    .join('\n');
}
