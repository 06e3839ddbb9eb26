// What the base image's busybox (Debian's busybox-static) lacks or gets wrong, fixed
// in the image: a nohup, and a wget that does not crash on -T. Pure, unit-tested.

/**
 * Debian's static busybox (before 1.36.1-5) is built without wget's timeout support
 * but still parses -T as a number and writes it through a NULL pointer: every
 * `wget -T N` segfaulted. A wrapper on PATH cannot catch that alone, because this
 * busybox's sh runs its own applets before looking at PATH (FEATURE_SH_STANDALONE):
 * so the image's copy has the applet renamed, and `wget` is the wrapper below.
 * The new name keeps the applet table's sort order, which its lookup relies on.
 */
export const WGET_APPLET = "wgeT";

/**
 * Rename busybox's wget applet in its table of names (a NUL-separated, sorted list)
 * when its wget has the -T crash (`wgetHelp`, its usage, offers no -T). A busybox
 * whose table is not laid out as expected is left alone (and gets no wget wrapper).
 */
export function patchBusybox(binary: Buffer, wgetHelp: string): { binary: Buffer; wgetRenamed: boolean } {
  if (/-T SEC/.test(wgetHelp)) return { binary, wgetRenamed: false };
  const from = Buffer.from("\0wc\0wget\0which\0");
  const at = binary.indexOf(from);
  if (at < 0 || binary.indexOf(from, at + 1) >= 0) return { binary, wgetRenamed: false };
  const out = Buffer.from(binary);
  out.write(WGET_APPLET, at + "\0wc\0".length, "latin1");
  return { binary: out, wgetRenamed: true };
}

/**
 * Tools as scripts over busybox. Each goes where busybox would link the applet, and
 * only where the root has nothing of that name on PATH.
 */
export function busyboxShims(wgetRenamed: boolean): { path: string; text: string }[] {
  return [{ path: "usr/bin/nohup", text: nohupScript() }, ...(wgetRenamed ? [{ path: "usr/bin/wget", text: wgetScript() }] : [])];
}

/** Debian's static busybox has no nohup applet; this one behaves as coreutils' does. */
export function nohupScript(): string {
  return `#!/opt/forkd/bin/busybox sh
# forkd: busybox has no nohup here. As coreutils: SIGHUP ignored, stdin from /dev/null
# and output to nohup.out only where they are a terminal, 125 for a usage error.
[ "$1" = -- ] && shift
if [ $# -eq 0 ]; then echo "Usage: nohup COMMAND [ARG]..." >&2; exit 125; fi
trap '' HUP
if [ -t 0 ]; then exec </dev/null; fi
if [ -t 1 ]; then
  if ( : >>nohup.out ) 2>/dev/null; then out=nohup.out; else out=\${HOME:-/root}/nohup.out; fi
  echo "nohup: ignoring input and appending output to '$out'" >&2
  exec >>"$out"
fi
if [ -t 2 ]; then exec 2>&1; fi
exec "$@"
`;
}

/**
 * busybox wget without its -T crash: -T N, -TN, --timeout=N and --timeout N are
 * taken out of the arguments (short-option clusters and option values understood)
 * and enforced as a limit on the whole run with busybox timeout (exit 4, as GNU
 * wget's network failure, when it runs out).
 */
export function wgetScript(): string {
  return `#!/opt/forkd/bin/busybox sh
# forkd: busybox's wget crashes on -T (built without timeout support), so the applet is
# renamed ${WGET_APPLET} in this image and this wrapper turns -T into a time limit.
BB=/opt/forkd/bin/busybox
limit=
n=$#
while [ "$n" -gt 0 ]; do
  a=$1; shift; n=$((n - 1))
  case $a in
    --)
      set -- "$@" --
      while [ "$n" -gt 0 ]; do set -- "$@" "$1"; shift; n=$((n - 1)); done ;;
    --timeout=*) limit=\${a#*=} ;;
    --timeout)
      if [ "$n" -gt 0 ]; then limit=$1; shift; n=$((n - 1)); fi ;;
    --output-document|--output-file|--directory-prefix|--proxy|--user-agent|--tries|--header|--post-data|--post-file|--method)
      set -- "$@" "$a"
      if [ "$n" -gt 0 ]; then set -- "$@" "$1"; shift; n=$((n - 1)); fi ;;
    --*) set -- "$@" "$a" ;;
    -?*)
      # A cluster of short options: letters up to one that takes a value are flags.
      rest=\${a#-}; keep=-; value_next=
      while [ -n "$rest" ]; do
        c=\${rest%"\${rest#?}"}; rest=\${rest#?}
        case $c in
          T)
            if [ -n "$rest" ]; then limit=$rest
            elif [ "$n" -gt 0 ]; then limit=$1; shift; n=$((n - 1)); fi
            rest= ;;
          [OoPYUt])
            keep=$keep$c$rest
            [ -z "$rest" ] && value_next=1
            rest= ;;
          *) keep=$keep$c ;;
        esac
      done
      [ "$keep" != - ] && set -- "$@" "$keep"
      if [ -n "$value_next" ] && [ "$n" -gt 0 ]; then set -- "$@" "$1"; shift; n=$((n - 1)); fi ;;
    *) set -- "$@" "$a" ;;
  esac
done
case $limit in
  '') exec $BB ${WGET_APPLET} "$@" ;;
  *[!0-9.]*|*.*.*|.) echo "wget: invalid timeout '$limit'" >&2; exit 2 ;;
esac
# 0 is no limit, as in GNU wget.
case $limit in *[1-9]*) ;; *) exec $BB ${WGET_APPLET} "$@" ;; esac
$BB timeout "$limit" $BB ${WGET_APPLET} "$@"
status=$?
if [ "$status" -eq 143 ]; then echo "wget: gave up after $limit s (-T)" >&2; exit 4; fi
exit "$status"
`;
}
