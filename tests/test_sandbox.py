"""d-run's plan from pure pieces: the bwrap command line, the image config, users, volumes, tmpfs, the
environment, the command, host names and the user-namespace settings, without starting a sandbox."""

import pytest
from test_run import IMAGE_CONFIG

from dutils.errors import Error
from dutils.sandbox import (
    Bind,
    Identity,
    ImageConfig,
    Mount,
    Plan,
    absolute_path,
    bwrap_argv,
    check_hostname,
    container_command,
    container_env,
    default_hostname,
    merged_mounts,
    parse_config,
    parse_entrypoint,
    parse_env,
    parse_env_file,
    parse_tmpfs,
    parse_volume,
    resolve_user,
    userns_error,
    volume_target,
)

PASSWD = "root:x:0:0:root:/root:/bin/sh\n# a comment\napp:x:1000:1000::/home/app:/bin/sh\nodd line\n"
GROUP = "root:x:0:\nbad:x:notanumber:\napp:x:1000:\nstaff:x:50:app\n"


def sandbox(**fields) -> Plan:
    base = {"root_fd": 3, "command": ("sh",), "identity": Identity(0, 0, "/root"), "hostname": "box"}
    base |= {"workdir": "/", "env": {}}
    return Plan(**(base | fields))


def test_argv_has_the_safe_defaults():
    argv = bwrap_argv(sandbox(env={"PATH": "/bin"}))
    for option in ["--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--clearenv"]:
        assert option in argv
    assert "--share-net" not in argv
    assert argv[argv.index("--bind-fd") : argv.index("--bind-fd") + 3] == ["--bind-fd", "3", "/"]
    joined = " ".join(argv)
    assert "--proc /proc --dev /dev --tmpfs /tmp" in joined and "--remount-ro /" in joined
    assert argv.index("--clearenv") < argv.index("--setenv")
    assert argv[argv.index("--") :] == ["--", "sh"]


def test_argv_makes_the_root_read_only_after_every_mount():
    argv = bwrap_argv(sandbox(binds=(Bind(4, "/data"), Bind(5, "/etc/x", read_only=True))))
    remount = argv.index("--remount-ro")
    assert argv[remount + 1] == "/"
    assert max(i for i, word in enumerate(argv) if word in ("--bind-fd", "--ro-bind-fd", "--ro-bind-data")) < remount
    assert argv[argv.index("--ro-bind-fd") : argv.index("--ro-bind-fd") + 3] == ["--ro-bind-fd", "5", "/etc/x"]
    assert "--bind" not in argv and "--ro-bind" not in argv  # sources are descriptors: no path resolved again
    assert "--remount-ro" not in bwrap_argv(sandbox(writable=True))


def test_argv_follows_the_sandbox():
    box = sandbox(
        identity=Identity(1000, 50, "/home/app"),
        network=True,
        hostname="web",
        workdir="/srv",
        seccomp_fd=7,
        new_session=False,
        data_files=((5, "/etc/hosts"),),
        command=("-x", "--", "--help"),
    )
    argv = bwrap_argv(box)
    joined = " ".join(argv)
    assert "--share-net" in argv and "--new-session" not in argv
    assert "--uid 1000 --gid 50" in joined and "--hostname web" in joined and "--chdir /srv" in joined
    assert "--seccomp 7" in joined and "--ro-bind-data 5 /etc/hosts" in joined
    assert argv[argv.index("--") :] == ["--", "-x", "--", "--help"]  # the command exactly, after bwrap's --


@pytest.mark.parametrize(
    "spec, mount",
    [
        ("/data", Mount("/data")),
        ("/data:ro", Mount("/data", read_only=True)),
        ("/srv/web:/var/www", Mount("/var/www", "/srv/web")),
        ("./src:/src:ro", Mount("/src", "./src", read_only=True)),
        ("/a:/b/./c//:rw", Mount("/b/c", "/a")),
    ],
)
def test_parse_volume(spec, mount):
    assert parse_volume(spec) == mount


@pytest.mark.parametrize("spec", ["data", "/a:data", "/a:/b:/c", ":/b", "/a:/", "/a:/b/../c", "/a:/b:xx"])
def test_parse_volume_refuses(spec):
    with pytest.raises(ValueError):
        parse_volume(spec)


def test_env_items_and_files():
    assert parse_env("A=1=2") == ("A", "1=2") and parse_env("A=") == ("A", "") and parse_env("A") == ("A", None)
    for bad in ["=1", "", "A B=1"]:
        with pytest.raises(ValueError):
            parse_env(bad)
    text = '# comment\n\n  SPACED=kept as is \nQUOTED="q"\nFROM_HOST\n'
    assert parse_env_file(text) == [("SPACED", "kept as is "), ("QUOTED", '"q"'), ("FROM_HOST", None)]


def test_environment_layers_later_wins():
    base = {"PATH": "/bin", "HOME": "/root"}
    image = ("PATH=/usr/bin:/bin", "LANG=C", "EMPTY=")
    user = [("LANG", "C.UTF-8"), ("FROM_HOST", None), ("ABSENT", None)]
    env = container_env(base, image, user, {"FROM_HOST": "yes"})
    assert env == {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "EMPTY": "", "FROM_HOST": "yes"}


@pytest.mark.parametrize(
    "entrypoint, cmd, override, args, expected",
    [
        ((), ("sh",), None, [], ("sh",)),
        ((), ("sh",), None, ["ls", "-l"], ("ls", "-l")),
        (("tini", "--"), ("sh",), None, [], ("tini", "--", "sh")),
        (("tini", "--"), ("sh",), None, ["-x"], ("tini", "--", "-x")),
        (("tini", "--"), ("sh",), ("env",), [], ("env",)),  # --entrypoint drops Cmd, as Docker does
        (("tini", "--"), ("sh",), ("echo",), ["a"], ("echo", "a")),
        (("tini", "--"), ("sh",), (), ["id"], ("id",)),
    ],
)
def test_command_is_entrypoint_then_arguments_or_cmd(entrypoint, cmd, override, args, expected):
    config = ImageConfig(entrypoint=entrypoint, cmd=cmd)
    assert container_command(config, override, args) == expected


@pytest.mark.parametrize(
    "text, words",
    [
        ("sh", ("sh",)),
        ("", ()),
        ('["/bin/sh", "-c"]', ("/bin/sh", "-c")),
        ("[]", ()),
        ("[x", None),
        ('["a", 1]', None),
        ("[" * 100_000, None),
    ],
)
def test_entrypoint_as_podman_takes_it(text, words):
    if words is None:
        with pytest.raises(ValueError, match="JSON list of strings"):
            parse_entrypoint(text)
    else:
        assert parse_entrypoint(text) == words


def test_tmpfs_mounts_in_mount_order_with_their_size():
    assert parse_tmpfs("/run") == Mount("/run", tmpfs=0)
    assert parse_tmpfs("/var/lib/x/:size=65536") == Mount("/var/lib/x", tmpfs=65536)
    for spec in ("run", "/run:size=1m", "/run:mode=1777", "/", "/proc/x"):
        with pytest.raises(ValueError):
            parse_tmpfs(spec)
    argv = bwrap_argv(sandbox(binds=(Bind(None, "/run", size=4096), Bind(4, "/run/x"), Bind(None, "/srv"))))
    assert " ".join(argv).count("--size 4096 --tmpfs /run --bind-fd 4 /run/x --tmpfs /srv") == 1


def test_nothing_to_run_is_an_error():
    with pytest.raises(Error, match="no Entrypoint or Cmd"):
        container_command(ImageConfig(), None, [])


@pytest.mark.parametrize(
    "spec, identity",
    [
        ("", Identity(0, 0, "/root")),
        ("app", Identity(1000, 1000, "/home/app")),
        ("1000", Identity(1000, 1000, "/home/app")),
        ("app:staff", Identity(1000, 50, "/home/app")),
        ("app:0", Identity(1000, 0, "/home/app")),
        ("4321", Identity(4321, 0, "/")),  # not listed: group 0 and HOME=/, as Docker
        ("4321:77", Identity(4321, 77, "/")),
        (":staff", Identity(0, 50, "/root")),
    ],
)
def test_resolve_user(spec, identity):
    assert resolve_user(spec, PASSWD, GROUP) == identity


@pytest.mark.parametrize(
    "spec, words", [("nobody", "'nobody' is not in the image's /etc/passwd"), ("app:wheel", "'wheel'")]
)
def test_unknown_user_or_group(spec, words):
    with pytest.raises(Error, match=words):
        resolve_user(spec, PASSWD, GROUP)


def test_merged_mounts_put_parents_first_and_flags_over_config():
    defaults = [Mount("/var/lib/db"), Mount("/var"), Mount("/data")]
    volumes = [Mount("/data", "/host/data", read_only=True), Mount("/a-b", "/x")]
    merged = merged_mounts(defaults, volumes)
    assert [m.target for m in merged] == ["/a-b", "/data", "/var", "/var/lib/db"]
    assert merged[1] == Mount("/data", "/host/data", read_only=True)


@pytest.mark.parametrize("name", ["a", "web-1", "a.b.c", "x" * 63, ".".join(["x" * 63] * 3 + ["x" * 61]), "9"])
def test_host_names_as_rfc_1123_allows(name):
    assert check_hostname(name) == name


@pytest.mark.parametrize(
    "name", ["", "-a", "a-", "a_b", "a..b", ".a", "a.", "box\n1.2.3.4 evil", "x" * 64, ".".join(["x" * 63] * 4), "é"]
)
def test_host_names_rfc_1123_refuses(name):
    with pytest.raises(ValueError):
        check_hostname(name)


@pytest.mark.parametrize("path", ["//", "/.", "/./", "///.//", "/x/..", "/x/../y", "x", "/a\x00b", "/a\nb", "/a\x1bb"])
def test_volume_targets_refused(path):
    with pytest.raises(ValueError):
        volume_target(path)


def test_volume_targets_normalised():
    assert volume_target("//data/./x//") == "/data/x" and absolute_path("/") == "/"


@pytest.mark.parametrize("spec", ["\u00b2", "\u0661", "app:\u0661", "\u00b2:0"])
def test_ids_are_ascii_digits_only(spec):
    passwd = PASSWD + "sup:x:\u00b2:1::/:/bin/sh\narab:x:\u0661:1::/:/bin/sh\n"
    with pytest.raises(Error, match="is not in the image's"):
        resolve_user(spec, passwd, GROUP + "odd:x:\u0661:\n")


def test_default_hostname():
    assert default_hostname("busybox") == "busybox"
    assert default_hostname("my image_1.0") == "my-image-1-0"
    assert default_hostname("___") == "d-run" and len(default_hostname("x" * 100)) == 63


@pytest.mark.parametrize(
    "change, key",
    [
        ({"Env": "A=1"}, "'Env'"),
        ({"Env": ["=1"]}, "'Env'"),
        ({"Cmd": "ls -l"}, "'Cmd'"),
        ({"Entrypoint": [1]}, "'Entrypoint'"),
        ({"User": 1000}, "'User'"),
        ({"Volumes": ["/data"]}, "'Volumes'"),
        ({"Volumes": {"data": {}}}, "'Volumes'"),
        ({"WorkingDir": "relative"}, "'WorkingDir'"),
        ({"Hostname": "h" * 65}, "'Hostname'"),
        ({"net": "yes"}, "'net'"),
        ({"rw": 1}, "'rw'"),
    ],
)
def test_malformed_config_names_the_key(change, key):
    with pytest.raises(Error, match=key):
        parse_config(IMAGE_CONFIG | change)


def test_config_keys_read():
    config = parse_config(
        IMAGE_CONFIG | {"User": "app", "Volumes": {"/data/": {}}, "WorkingDir": "/srv/", "net": True, "Labels": {}}
    )
    assert (config.user, config.volumes, config.workdir) == ("app", ("/data",), "/srv")
    assert (config.net, config.rw) == (True, False)
    assert parse_config({}) == ImageConfig()


def test_userns_settings():
    assert userns_error("15000\n", "1\n", 1000) is None
    assert userns_error("15000\n", "", 1000) is None  # kernels without the Debian switch
    assert userns_error("15000\n", "0\n", 0) is None  # root may, whatever the switch says
    assert "unprivileged_userns_clone" in str(userns_error("15000\n", "0\n", 1000))
    assert "max_user_namespaces" in str(userns_error("0\n", "1\n", 0))
