// The Herald SDK as an Android library, published as dev.herald:herald-android:<version>
// (the workspace version of ../../Cargo.toml: one version for gateway, protocol and SDK).
// It holds the UniFFI-generated Kotlin binding and libherald_ffi.so for arm64-v8a,
// armeabi-v7a and x86_64 (16 KB page-aligned), both taken from the repository's
// bindings/generated (run `bash bindings/build-android.sh` from the repository root
// first), and depends on JNA's AAR (JNA with its Android dispatch libraries; 5.17.0 is
// the first whose libjnidispatch.so works with 16 KB pages) and on the Kotlin component of
// the TLS verifier (org.rustls:rustls-platform-verifier, below). Publish to ~/.m2:
//   cd android-sample && ./gradlew :herald:publishToMavenLocal
// (README.md, "Add the SDK to an app").
plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
    id("maven-publish")
}

val repoRoot = rootDir.resolve("..")
val generated = repoRoot.resolve("bindings/generated")
val bindingFile = generated.resolve("kotlin/dev/herald/sdk/herald_ffi.kt")
val jniLibs = generated.resolve("android/jniLibs")
val abis = listOf("arm64-v8a", "armeabi-v7a", "x86_64")
val missing = (listOf(bindingFile) + abis.map { jniLibs.resolve("$it/libherald_ffi.so") }).filter { !it.exists() }
if (missing.isNotEmpty()) {
    throw GradleException(
        "Herald binding not built: missing ${missing.joinToString()}. " +
            "Run `bash bindings/build-android.sh` from the repository root (needs cargo-ndk and the NDK)."
    )
}

// [workspace.package] version = "…" of the repository's Cargo.toml.
val heraldVersion: String = repoRoot.resolve("Cargo.toml").readLines()
    .dropWhile { it.trim() != "[workspace.package]" }.drop(1)
    .takeWhile { !it.startsWith("[") }
    .firstNotNullOfOrNull { Regex("^version\\s*=\\s*\"([^\"]+)\"").find(it)?.groupValues?.get(1) }
    ?: throw GradleException("no [workspace.package] version in ${repoRoot.resolve("Cargo.toml")}")

// The Kotlin component of the SDK's TLS verifier (rustls-platform-verifier: Android's
// trust manager through JNI, see HeraldAndroid.kt). Its version must be the one the Rust
// crate was built against: the version of the rustls-platform-verifier-android crate in
// the repository's Cargo.lock (that crate carries nothing but this version). The AAR comes
// from the verifier project's Maven repository (settings.gradle.kts).
val rustlsPlatformVerifierVersion: String = repoRoot.resolve("Cargo.lock").readLines().let { lines ->
    val at = lines.indexOfFirst { it.trim() == "name = \"rustls-platform-verifier-android\"" }
    lines.drop(at + 1).firstOrNull { it.trimStart().startsWith("version = ") }
        ?.substringAfter('"')?.substringBefore('"')
        ?.takeIf { at >= 0 && it.isNotEmpty() }
} ?: throw GradleException("no rustls-platform-verifier-android in ${repoRoot.resolve("Cargo.lock")}")

group = "dev.herald"
version = heraldVersion

android {
    namespace = "dev.herald.sdk"
    compileSdk = 35
    defaultConfig {
        minSdk = 24
        consumerProguardFiles("consumer-rules.pro")
    }
    sourceSets["main"].java.srcDir(generated.resolve("kotlin"))
    sourceSets["main"].jniLibs.srcDir(jniLibs)
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
    publishing {
        singleVariant("release") {
            withSourcesJar()
        }
    }
}

dependencies {
    api("net.java.dev.jna:jna:5.17.0@aar")
    implementation("org.rustls:rustls-platform-verifier:$rustlsPlatformVerifierVersion")
}

publishing {
    publications {
        register<MavenPublication>("release") {
            groupId = "dev.herald"
            artifactId = "herald-android"
            version = heraldVersion
            afterEvaluate { from(components["release"]) }
            pom {
                name.set("Herald SDK for Android")
                description.set("Herald notification client: live WebSocket delivery with acks, push fallback, catch-up")
                licenses {
                    license {
                        name.set("Apache-2.0")
                        url.set("https://www.apache.org/licenses/LICENSE-2.0")
                    }
                }
            }
        }
    }
}
